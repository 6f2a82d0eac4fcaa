// Reference outputs from llama.cpp for the tests: tokenises a prompt exactly as
// llama.cpp does (special tokens parsed, BOS per the GGUF) and decodes greedily,
// printing one JSON object: prompt ids, generated ids, and the top-2 logprobs per step.
// Built by scripts/llama-ref/build.sh against the llama.cpp that build-llama-cpp.sh makes.
//
//   llama-ref-greedy MODEL.gguf N_TOKENS < prompt.txt
#include "ggml-backend.h"
#include "llama.h"
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static void log_quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf N_TOKENS < prompt\n", argv[0]);
        return 2;
    }
    const int n_gen = std::stoi(argv[2]);
    std::string prompt((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    llama_log_set(log_quiet, nullptr);
    ggml_backend_load_all();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int n = -llama_tokenize(vocab, prompt.data(), prompt.size(), nullptr, 0, true, true);
    std::vector<llama_token> toks(n);
    llama_tokenize(vocab, prompt.data(), prompt.size(), toks.data(), n, true, true);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 2;
    // LLAMA_REF_PRECISE=1: f32 KV cache and no flash attention, instead of llama.cpp's
    // defaults (f16 cache, flash attention where available). The tests use the two to
    // measure how far llama.cpp's own precision settings move its results.
    if (const char * p = std::getenv("LLAMA_REF_PRECISE"); p && std::string(p) == "1") {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    printf("{\"prompt_tokens\":[");
    for (int i = 0; i < n; i++) printf(i ? ",%d" : "%d", toks[i]);
    printf("],\"steps\":[");
    std::vector<llama_token> cur = toks;
    for (int s = 0; s < n_gen; s++) {
        if (llama_decode(ctx, llama_batch_get_one(cur.data(), cur.size()))) { fprintf(stderr, "decode failed\n"); return 1; }
        const float * lg = llama_get_logits_ith(ctx, -1);
        double mx = -INFINITY;
        for (int i = 0; i < n_vocab; i++) mx = std::max(mx, (double) lg[i]);
        double sum = 0;
        for (int i = 0; i < n_vocab; i++) sum += std::exp(lg[i] - mx);
        const double lse = mx + std::log(sum);
        int a = 0, b = -1;
        for (int i = 1; i < n_vocab; i++) {
            if (lg[i] > lg[a]) { b = a; a = i; } else if (b < 0 || lg[i] > lg[b]) { b = i; }
        }
        if (b < 0) b = a == 0 ? 1 : 0;
        printf("%s{\"id\":%d,\"top\":[[%d,%.6f],[%d,%.6f]]}", s ? "," : "", a, a, lg[a] - lse, b, lg[b] - lse);
        if (llama_vocab_is_eog(vocab, a)) break;
        cur.assign(1, a);
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
