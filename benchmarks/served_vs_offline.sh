#!/usr/bin/env bash
# The same 1000 ShareGPT-like requests served over HTTP at request rate inf and run offline, in one
# lease, with the served engine's step timeline and both server processes' CPU time.
#
#   bash scripts/gpu_wheels.sh                                   # here, once: the server's wheels
#   # on the GPU machine (device tool, carry [".whl"]):
#   OUT=$OUT bash benchmarks/served_vs_offline.sh [extra server flags, e.g. --no-separate-engine-process]
#
# Writes under $OUT (six files, within the device tool's limit of eight): server.log (with the
# engine's step timeline as JSON at the end), serve_inf.json and serve_inf.log (benchmarks/serve.py),
# cpu.txt (CPU seconds of the HTTP process and of the engine process during the served run: what
# each costs per streamed token), throughput.json and throughput.log (benchmarks/throughput.py with
# the server stopped). SERVE_ONLY=1 skips the offline run; NUM_PROMPTS (default 1000) for both;
# MODEL / DTYPE (default the Llama-2-7B config, bfloat16), SERVE_FLAGS (serve.py) and THROUGHPUT_FLAGS
# for a CPU smoke run. RATES="4 8 16 32" also serves at those Poisson rates after the rate-inf run,
# each for about RATE_SECONDS (default 45) of arrivals: serve_rates.jsonl (one result a line, its
# "rate" added, with the goodput for the objectives in GOODPUT, default "ttft:500 tpot:50" in ms)
# and serve_rates.log — eight files in all.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
PY=${PY:-python3}
N=${NUM_PROMPTS:-1000}
MODEL=${MODEL:-benchmarks/configs/llama-2-7b}
DTYPE=${DTYPE:-bfloat16}
PORT=${PORT:-8000}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-deps --target /tmp/srv .whl/*.whl > /dev/null 2>&1 || echo "installing .whl failed; using the installed packages" >&2
fi
export PYTHONPATH=.:/tmp/srv
cpu_s() {  # user + system CPU seconds of a process (0 if gone)
    [ -r "/proc/$1/stat" ] && awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat" || echo 0
}
"$PY" -m jaxpaged.serve --model "$MODEL" --load-format dummy --dtype "$DTYPE" \
    --skip-tokenizer-init --max-model-len 2048 --async-scheduling --disable-access-log --port "$PORT" \
    --log-step-timeline "$@" > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 1 400); do
    curl -sf "localhost:$PORT/health" > /dev/null && break
    kill -0 "$server" 2> /dev/null || break
    sleep 1
done
engine=$(pgrep -P "$server" -f spawn_main | head -1)
http0=$(cpu_s "$server"); engine0=$(cpu_s "${engine:-0}"); t0=$(date +%s.%N)
"$PY" benchmarks/serve.py --base-url "http://127.0.0.1:$PORT" --dataset sharegpt-like --num-prompts "$N" \
    --request-rate inf ${SERVE_FLAGS:-} --result-json "$OUT/serve_inf.json" > "$OUT/serve_inf.log" 2>&1
http1=$(cpu_s "$server"); engine1=$(cpu_s "${engine:-0}"); t1=$(date +%s.%N)
tokens=$("$PY" -c "import json; print(json.load(open('$OUT/serve_inf.json')).get('total_output_tokens', 0))" 2> /dev/null || echo 0)
"$PY" - "$http0" "$http1" "$engine0" "$engine1" "$t0" "$t1" "$tokens" > "$OUT/cpu.txt" <<'PYEOF'
import sys
h0, h1, e0, e1, t0, t1, tokens = map(float, sys.argv[1:])
wall = t1 - t0
print(f"served run wall {wall:.1f} s, {tokens:.0f} output tokens")
print(f"HTTP process: {h1 - h0:.1f} CPU s = {(h1 - h0) / wall:.2f} cores, {1e6 * (h1 - h0) / max(tokens, 1):.1f} us per token")
print(f"engine process: {e1 - e0:.1f} CPU s = {(e1 - e0) / wall:.2f} cores (0: engine on a thread of the HTTP process)")
PYEOF
echo "open files: server soft limit $(awk '/Max open files/ {print $4}' "/proc/$server/limits" 2> /dev/null), \
shell's $(ulimit -n); $(nproc) CPUs" >> "$OUT/cpu.txt"
for rate in ${RATES:-}; do
    n=$("$PY" -c "print(min($N, max(1, int($rate * ${RATE_SECONDS:-45}))))")
    echo "== rate $rate, $n prompts" >> "$OUT/serve_rates.log"
    "$PY" benchmarks/serve.py --base-url "http://127.0.0.1:$PORT" --dataset sharegpt-like --num-prompts "$n" \
        --request-rate "$rate" --goodput ${GOODPUT:-ttft:500 tpot:50} ${SERVE_FLAGS:-} --result-json /tmp/serve_rate.json >> "$OUT/serve_rates.log" 2>&1 &&
        "$PY" -c "import json; r = json.load(open('/tmp/serve_rate.json')); r['rate'] = $rate; print(json.dumps(r))" \
            >> "$OUT/serve_rates.jsonl"
done
kill -INT "$server"
wait "$server"
if [ -z "${SERVE_ONLY:-}" ]; then
    "$PY" benchmarks/throughput.py --backend jaxpaged --model "$MODEL" --dtype "$DTYPE" --num-requests "$N" \
        --async-scheduling --hf-num-requests "$N" ${THROUGHPUT_FLAGS:-} --json "$OUT/throughput.json" \
        > "$OUT/throughput.log" 2>&1
fi
