// Reference block bytes from ggml's own quantisers (ggml_quantize_chunk, no importance
// matrix: what llama-quantize writes). Reads ROWS×COLS f32 from stdin, writes
// OUTDIR/TYPE.bin for each type. Built by scripts/llama-ref/build.sh.
//
//   llama-ref-quantize ROWS COLS OUTDIR < input.f32
#include "ggml.h"
#include "ggml-cpu.h"
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s ROWS COLS OUTDIR < f32\n", argv[0]); return 2; }
    const int64_t rows = atoll(argv[1]), cols = atoll(argv[2]);
    std::vector<float> x(rows * cols);
    if (fread(x.data(), sizeof(float), x.size(), stdin) != x.size()) { fprintf(stderr, "short input\n"); return 1; }
    ggml_cpu_init();
    const std::pair<const char *, ggml_type> types[] = {
        {"f16", GGML_TYPE_F16}, {"bf16", GGML_TYPE_BF16}, {"q8_0", GGML_TYPE_Q8_0}, {"q4_0", GGML_TYPE_Q4_0},
        {"q4_1", GGML_TYPE_Q4_1}, {"q5_0", GGML_TYPE_Q5_0}, {"q5_1", GGML_TYPE_Q5_1}, {"q2_k", GGML_TYPE_Q2_K},
        {"q3_k", GGML_TYPE_Q3_K}, {"q4_k", GGML_TYPE_Q4_K}, {"q5_k", GGML_TYPE_Q5_K}, {"q6_k", GGML_TYPE_Q6_K},
    };
    for (auto & [name, t] : types) {
        std::vector<uint8_t> out(ggml_row_size(t, cols) * rows);
        size_t n = ggml_quantize_chunk(t, x.data(), out.data(), 0, rows, cols, nullptr);
        std::string path = std::string(argv[3]) + "/" + name + ".bin";
        FILE * f = fopen(path.c_str(), "wb");
        fwrite(out.data(), 1, n, f);
        fclose(f);
    }
    return 0;
}
