// ---- test driver (reft/backends/cpu/emulate.py) -------------------------------------------------
// Appended after a rendered forward source to make an executable that runs one step of
// reft_forward for targets this machine cannot load (aarch64 under qemu-user). argv[1] is a plain
// text spec, one directive per line; FILEs are raw bytes (paths relative to the spec's folder):
//   dims D...                       sizes of the symbols, in Lowered.symbols order
//   in FILE BYTES                   a graph input, in Lowered.inputs order
//   param FILE BYTES                a weight, in Lowered.params order (packed ones packed)
//   arena BYTES
//   scratch FLOATS                  per thread
//   threads N
//   deterministic 0|1               reproducible mode (reft_set_deterministic) for the step
//   out FILE BUFFER OFFSET BYTES    after the step, write BYTES of BUFFER (`arena`, or `inI` for
//                                   input I, which the step may write in place) from OFFSET to FILE
// Buffers are 64-byte aligned; the arena and scratch start zeroed, as the runtime's mmap-ed ones.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace driver {

std::string dir;   // the spec's folder

std::string path(const std::string& file) { return file[0] == '/' ? file : dir + file; }

[[noreturn]] void fail(const std::string& what) {
    fprintf(stderr, "reft driver: %s\n", what.c_str());
    exit(2);
}

char* alloc(int64_t bytes) {
    void* p = nullptr;
    const size_t n = bytes > 0 ? (size_t)(bytes + 63) / 64 * 64 : 64;
    if (posix_memalign(&p, 64, n) != 0) fail("cannot allocate " + std::to_string(bytes) + " bytes");
    memset(p, 0, n);
    return (char*)p;
}

char* load(const std::string& file, int64_t bytes) {
    char* p = alloc(bytes);
    FILE* f = fopen(path(file).c_str(), "rb");
    if (!f) fail("cannot open " + path(file));
    const bool exact = fread(p, 1, (size_t)bytes, f) == (size_t)bytes && fgetc(f) == EOF;
    fclose(f);
    if (!exact) fail(path(file) + " does not hold exactly " + std::to_string(bytes) + " bytes");
    return p;
}

void save(const std::string& file, const char* p, int64_t bytes) {
    FILE* f = fopen(path(file).c_str(), "wb");
    if (!f || fwrite(p, 1, (size_t)bytes, f) != (size_t)bytes || fclose(f) != 0)
        fail("cannot write " + path(file));
}

struct Out { std::string file, buffer; int64_t offset, bytes; };

}  // namespace driver

int main(int argc, char** argv) {
    using namespace driver;
    if (argc != 2) fail("usage: driver SPEC");
    const std::string spec = argv[1];
    dir = spec.substr(0, spec.rfind('/') + 1);   // "" without a slash
    std::ifstream text(spec);
    if (!text) fail("cannot open " + spec);
    std::vector<int64_t> dims, in_bytes;
    std::vector<void*> in;
    std::vector<const void*> params;
    std::vector<Out> outs;
    int64_t arena_bytes = 0, scratch_floats = 0, threads = 1, deterministic = 0;
    std::string line, key, file;
    for (int no = 1; std::getline(text, line); no++) {
        std::istringstream s(line);
        if (!(s >> key)) continue;
        int64_t v = 0;
        Out o;
        bool ok = false;
        if (key == "dims") {
            while (s >> v) dims.push_back(v);
            ok = s.eof();
        } else if (key == "in" || key == "param") {
            if ((ok = bool(s >> file >> v))) {
                char* p = load(file, v);
                if (key == "in") { in.push_back(p); in_bytes.push_back(v); } else params.push_back(p);
            }
        } else if (key == "out") {
            if ((ok = bool(s >> o.file >> o.buffer >> o.offset >> o.bytes))) outs.push_back(o);
        } else if (key == "arena") ok = bool(s >> arena_bytes);
        else if (key == "scratch") ok = bool(s >> scratch_floats);
        else if (key == "threads") ok = bool(s >> threads);
        else if (key == "deterministic") ok = bool(s >> deterministic);
        if (!ok) fail(spec + ":" + std::to_string(no) + ": cannot read `" + line + "`");
    }
    char* arena = alloc(arena_bytes);
    float* scratch = (float*)alloc(4 * scratch_floats * threads);
    reft_init(nullptr);
    reft_set_deterministic((int)deterministic);
    const int rc = reft_forward(dims.data(), in.data(), params.data(), arena, scratch, (int)threads);
    if (rc != 0) fail("reft_forward returned " + std::to_string(rc));
    for (const Out& o : outs) {
        const bool is_in = o.buffer.rfind("in", 0) == 0;
        const size_t i = is_in ? std::strtoul(o.buffer.c_str() + 2, nullptr, 10) : 0;
        if (is_in && i >= in.size()) fail("no input " + o.buffer);
        const int64_t size = is_in ? in_bytes[i] : arena_bytes;
        if (o.offset < 0 || o.bytes < 0 || o.offset + o.bytes > size)
            fail("out " + o.file + ": bytes [" + std::to_string(o.offset) + ", " + std::to_string(o.offset + o.bytes)
                 + ") lie outside " + o.buffer + " (" + std::to_string(size) + " bytes)");
        save(o.file, (is_in ? (const char*)in[i] : arena) + o.offset, o.bytes);
    }
    return 0;
}
