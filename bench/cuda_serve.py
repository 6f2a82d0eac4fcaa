"""`so8t serve --device cuda` under concurrent requests (issue #20), run on the GPU machine
by bench/cuda.sh's caller: each of N prompts alone (greedy), then all N at once (continuous
batching on the GPU); the answers and their verdicts must be the same. One JSON line out.
  python3 bench/cuda_serve.py SO8T MODEL [N]"""
import concurrent.futures as cf
import json
import subprocess
import sys
import time
import urllib.request

so8t, model = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
port = 8391
server = subprocess.Popen([so8t, "serve", "-m", model, "--device", "cuda", "--port", str(port), "--parallel", str(n)],
                          stderr=subprocess.PIPE, text=True)
base = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
model_id = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
prompts = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
           "How do I boil an egg?", "What is 12 times 12?", "Say hello in Spanish.", "Why is the sky blue?",
           "List two planets."][:n]


def ask(p):
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": p}], "max_tokens": 24,
                       "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=120))
    c = r["choices"][0]
    return c["message"]["content"], r.get("so8t")


try:
    t0 = time.perf_counter()
    alone = [ask(p) for p in prompts]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as ex:
        together = list(ex.map(ask, prompts))
    t_together = time.perf_counter() - t0
    same_text = [a[0] == b[0] for a, b in zip(alone, together)]
    print(json.dumps({"requests": n, "same_text": same_text, "seconds_one_by_one": t_alone,
                      "seconds_concurrent": t_together, "texts": [a[0] for a in alone],
                      "so8t_alone": [a[1] for a in alone][:1], "so8t_together": [b[1] for b in together][:1]}))
finally:
    server.terminate()
    try:
        err = server.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        server.kill()
        err = server.communicate()[1]
    print(err[-1500:], file=sys.stderr)
