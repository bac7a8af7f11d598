"""Speed and memory benchmark of edgelm, optionally against llama.cpp on the same GGUF file.

Each repetition of each engine runs in a fresh worker process (`python -m edgelm.bench.speed --worker`,
the job as JSON on stdin, the result as JSON on stdout), so load time and peak RSS belong to that engine
alone. Repetitions alternate engines, so a machine that gets busier or quieter affects both alike. Both
engines see the same prompt: random non-special token ids from a fixed seed, as llama-bench does.

edgelm runs a model directory in the plane layout on its kernels-only runtime (edgelm/runtime/engine.py,
no PyTorch), anything else (GGUF files, float or low-rank layers) on its PyTorch models. "load" is import
plus load, for both engines: what a user waits for before the first token can be computed.

Per worker: load the model, warm up (first calls pay for thread pools, kernel selection and faulting in
memory-mapped weights), then time
  - TTFT: a 128-token prompt through the prefill plus the greedy pick of the first token,
  - prompt processing: the -p token prompt through the prefill,
  - decode: -n greedy steps after that prompt, each one token in, argmax of its logits out.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import BenchmarkError, EdgelmError
from edgelm.kernels import usable_cpus
from edgelm.runtime import check_kv_bits

TTFT_PROMPT_TOKENS = 128
PROMPT_SEED = 0
LLAMA_CPP_BATCH = 512  # llama.cpp's default n_batch
NORMAL_TOKEN_TYPE = 1  # tokenizer.ggml.token_type of ordinary (non-special, non-byte) tokens
MIB = 2**20

EDGELM, LLAMA_CPP = "edgelm", "llama.cpp"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str  # format spec of its values in the table
    higher_is_better: bool


METRICS = (
    Metric("prompt_tps", "prompt tok/s", ".1f", True),
    Metric("decode_tps", "decode tok/s", ".2f", True),
    Metric("ttft_ms", "TTFT ms", ".0f", False),
    Metric("load_s", "import+load s", ".2f", False),
    Metric("peak_rss_mib", "peak RSS MiB", ".0f", False),
    Metric("model_mib", "model MiB", ".0f", False),
    Metric("effective_gbps", "effective GB/s", ".2f", True),
)


@dataclass
class Run:
    """One repetition of one engine, as its worker measured it."""

    engine: str
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    ttft_s: float
    prompt_s: float
    decode_s: float
    peak_rss_bytes: int
    model_bytes: int  # weights as the engine holds them in memory
    bytes_per_token: int  # weight bytes read to decode one token
    runtime: str = ""  # edgelm's: "kernels" (no PyTorch, runtime/engine.py) or "pytorch"

    def metrics(self) -> dict[str, float]:
        decode_tps = self.gen_tokens / self.decode_s
        return {
            "prompt_tps": self.prompt_tokens / self.prompt_s,
            "decode_tps": decode_tps,
            "ttft_ms": self.ttft_s * 1e3,
            "load_s": self.load_s,
            "peak_rss_mib": self.peak_rss_bytes / MIB,
            "model_mib": self.model_bytes / MIB,
            "effective_gbps": self.bytes_per_token * decode_tps / 1e9,
        }


@dataclass(frozen=True)
class Stats:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        return cls(min(values), statistics.median(values), max(values))


@dataclass
class BenchReport:
    model: str  # as the user named it
    model_path: str
    prompt_tokens: int
    gen_tokens: int
    threads: int
    reps: int
    runs: dict[str, list[Run]] = field(default_factory=dict)  # engine -> its repetitions in order

    @property
    def engines(self) -> list[str]:
        return list(self.runs)

    def summary(self, engine: str) -> dict[str, Stats]:
        per_run = [run.metrics() for run in self.runs[engine]]
        return {m.key: Stats.of([values[m.key] for values in per_run]) for m in METRICS}

    def ratios(self) -> dict[str, float]:
        """edgelm ÷ llama.cpp of the medians; empty when llama.cpp was not run."""
        if LLAMA_CPP not in self.runs:
            return {}
        ours, theirs = self.summary(EDGELM), self.summary(LLAMA_CPP)
        return {m.key: ours[m.key].median / theirs[m.key].median for m in METRICS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_path": self.model_path,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "ttft_prompt_tokens": TTFT_PROMPT_TOKENS,
            "threads": self.threads,
            "reps": self.reps,
            "engines": {
                engine: {
                    "runs": [{**asdict(run), **run.metrics()} for run in runs],
                    "summary": {key: asdict(stats) for key, stats in self.summary(engine).items()},
                }
                for engine, runs in self.runs.items()
            },
            "ratios": self.ratios(),
            "higher_is_better": {m.key: m.higher_is_better for m in METRICS},
        }

    def table(self) -> str:
        """Aligned plain-text table: median (min-max) per metric and engine, and the ratio."""
        ratios = self.ratios()
        header = ["metric", *self.engines]
        if ratios:
            header += ["edgelm/llama.cpp", ""]
        rows = [header]
        summaries = {engine: self.summary(engine) for engine in self.engines}
        for m in METRICS:
            row = [m.label]
            for engine in self.engines:
                s = summaries[engine][m.key]
                row.append(f"{s.median:{m.fmt}} ({s.min:{m.fmt}}-{s.max:{m.fmt}})")
            if ratios:
                favours = "> 1" if m.higher_is_better else "< 1"
                row += [f"{ratios[m.key]:#.3g}", f"({favours} favours edgelm)"]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        runtime = self.runs[EDGELM][0].runtime if self.runs.get(EDGELM) else ""
        lines = [
            f"{self.model}: prompt {self.prompt_tokens} tokens, decode {self.gen_tokens} tokens, "
            f"TTFT on a {TTFT_PROMPT_TOKENS}-token prompt; {self.threads} threads; "
            f"median (min-max) of {self.reps} reps" + (f"; edgelm on its {runtime} runtime" if runtime else ""),
            "",
        ]
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return "\n".join(lines)

    def brief(self) -> str:
        """One line for demos: edgelm's medians, and the decode/prompt ratios when compared."""
        s = self.summary(EDGELM)
        line = (f"{self.model}: prompt {self.prompt_tokens} tok @ {s['prompt_tps'].median:.1f} tok/s | "
                f"decode {self.gen_tokens} tok @ {s['decode_tps'].median:.1f} tok/s | "
                f"TTFT {s['ttft_ms'].median:.0f} ms | import+load {s['load_s'].median:.2f} s | "
                f"peak RSS {s['peak_rss_mib'].median:.0f} MiB")
        ratios = self.ratios()
        if ratios:
            line += (f" | vs llama.cpp: prompt {ratios['prompt_tps']:.2f}x, "
                     f"decode {ratios['decode_tps']:.2f}x")
        return line


def run_benchmark(model: str, prompt_tokens: int = 512, gen_tokens: int = 128, threads: int | None = None,
                  reps: int = 3, vs_llama_cpp: bool = False, progress: bool = True,
                  llama_cpp_model: str | None = None, kv_bits: int = 16, bits: int | None = None) -> BenchReport:
    """Benchmark a registry model, GGUF path or edgelm model directory; with vs_llama_cpp, alternate with
    llama.cpp per rep — on the same GGUF, or for a directory on `llama_cpp_model` (default: its source).
    `kv_bits` is edgelm's KV cache (16: float16, as llama.cpp's default cache, which it keeps); `bits` the
    precision an any-precision directory runs at (default: as saved)."""
    counts = {"-p/--prompt-tokens": prompt_tokens, "-n/--gen-tokens": gen_tokens, "--reps": reps}
    if threads is not None:
        counts["--threads"] = threads
    for name, value in counts.items():
        if value < 1:
            raise BenchmarkError(f"{name} must be >= 1, got {value}")
    check_kv_bits(kv_bits)
    if vs_llama_cpp:
        require_llama_cpp()
    from edgelm.registry import resolve

    path = resolve(model)
    if bits is not None and not path.is_dir():
        raise BenchmarkError(f"{path}: --bits selects a precision of an any-precision model directory; make one "
                             "with `edgelm quantize --method anyprec -o DIR`")
    metadata, model_context, source = model_facts(path)
    context = max(prompt_tokens + gen_tokens, TTFT_PROMPT_TOKENS + 1)  # +1: the warm-up decode step
    if context > model_context:
        raise BenchmarkError(f"-p {prompt_tokens} + -n {gen_tokens} exceeds the model's context of "
                             f"{model_context} tokens; lower -p or -n")
    llama_path = None
    if vs_llama_cpp:
        llama_path = resolve(llama_cpp_model) if llama_cpp_model else source
        if llama_path is None or not Path(llama_path).is_file():
            raise BenchmarkError(f"{path}: llama.cpp needs a GGUF to compare with and the directory's source "
                                 f"model is not at hand ({source}); pass --llama-cpp-model FILE_OR_NAME")
    tokens = benchmark_prompt(metadata, max(prompt_tokens, TTFT_PROMPT_TOKENS))
    threads = threads or usable_cpus()
    job = {"model_path": str(path), "prompt": tokens[:prompt_tokens], "ttft_prompt": tokens[:TTFT_PROMPT_TOKENS],
           "gen_tokens": gen_tokens, "threads": threads, "context": context, "kv_bits": kv_bits, "bits": bits}
    model_paths = {EDGELM: str(path), LLAMA_CPP: str(llama_path)}

    display_name = Path(model).stem if Path(model).suffix == ".gguf" else model
    if bits is not None:
        display_name += f" at {bits} bits"
    report = BenchReport(display_name, str(path), prompt_tokens, gen_tokens, threads, reps)
    engines = [EDGELM, LLAMA_CPP] if vs_llama_cpp else [EDGELM]
    for rep in range(1, reps + 1):
        for engine in engines:
            if progress:
                print(f"bench: rep {rep}/{reps} {engine} ...", end="", file=sys.stderr, flush=True)
            try:
                result = _run_worker({**job, "engine": engine, "model_path": model_paths[engine]}, rep)
            except BenchmarkError:
                if progress:
                    print(" failed", file=sys.stderr)
                raise
            run = Run(engine=engine, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, **result)
            report.runs.setdefault(engine, []).append(run)
            if progress:
                values = run.metrics()
                print(f" prompt {values['prompt_tps']:.1f} tok/s, decode {values['decode_tps']:.2f} tok/s, "
                      f"import+load {run.load_s:.2f} s", file=sys.stderr, flush=True)
    return report


def model_facts(path: Path) -> tuple[dict[str, Any], int, str | None]:
    """(GGUF-style metadata with the tokenizer, context length, source GGUF) of a GGUF or model directory."""
    if path.is_dir():
        from edgelm.io.artifact import read_config, read_tokenizer_metadata

        config = read_config(path)
        source = config.get("source")
        return read_tokenizer_metadata(path), int(config["model_args"]["max_context"]), source
    from edgelm.io.gguf import GGUFFile

    gguf = GGUFFile(path)
    context = gguf.metadata.get(f"{gguf.architecture}.context_length", 1 << 30)
    return gguf.metadata, int(context), str(path)


def require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise BenchmarkError("--vs-llama-cpp needs llama-cpp-python, which is not installed: "
                             "pip install 'edgelm[llama]'") from None


def benchmark_prompt(metadata: dict[str, Any], n_tokens: int, seed: int = PROMPT_SEED) -> list[int]:
    """Deterministic random ordinary tokens; BOS first when the model adds one, as llama-bench does."""
    token_types = metadata.get("tokenizer.ggml.token_type")
    vocab_size = len(metadata["tokenizer.ggml.tokens"])
    candidates = (np.flatnonzero(np.asarray(token_types) == NORMAL_TOKEN_TYPE) if token_types is not None
                  else np.arange(vocab_size))
    tokens = np.random.default_rng(seed).choice(candidates, size=n_tokens).tolist()
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokens[0] = int(bos)
    return tokens


def bytes_read_per_token(total_bytes: int, embedding_bytes: int, vocab_size: int, tied: bool) -> int:
    """Weight bytes one decode step reads: all of them, except that an untied embedding table is only
    looked up (one row) while the separate output matrix is read whole."""
    if tied:  # the embedding table doubles as the output matrix
        return total_bytes
    return total_bytes - embedding_bytes + embedding_bytes // vocab_size


def _run_worker(job: dict[str, Any], rep: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "edgelm.bench.speed", "--worker"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise BenchmarkError(f"the {job['engine']} worker of rep {rep} failed: {detail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- worker side ----------------------------------------------------------------------------------------------

class _EdgelmRunner:
    """edgelm: a model directory in the plane layout on its kernels-only runtime (PyTorch is never imported),
    anything else (GGUF files, float or low-rank layers) on its PyTorch models."""

    def __init__(self, model_path: str, threads: int, context: int, kv_bits: int, bits: int | None = None):
        from edgelm.runtime.engine import KernelEngine, unsupported_reason

        if bits is None and unsupported_reason(model_path) is None:
            self.runtime = "kernels"
            self.model = KernelEngine.load(model_path, threads=threads)
        else:
            import torch

            import edgelm

            self.runtime = "pytorch"
            torch.set_num_threads(threads)
            self.model, _ = edgelm.load(model_path, pull=False, keep_quantized=True, bits=bits)
        self.model.set_kv_bits(kv_bits)
        # llama.cpp allocates its KV cache while loading; the static cache here is reused by every phase.
        self.model.setup_caches(context)
        self.pos = 0
        self.logits = None

    def prefill(self, tokens: list[int]) -> None:
        from edgelm.runtime.generate import prefill

        # Positions restart at 0: the static cache is overwritten in place, older entries are never seen.
        self.logits = prefill(self.model, tokens)
        self.pos = len(tokens)

    def decode(self, token: int) -> None:
        from edgelm.runtime.generate import decode_step

        self.logits = decode_step(self.model, token, self.pos)
        self.pos += 1

    def greedy_token(self) -> int:
        return int(self.logits.argmax())

    def weight_bytes(self) -> tuple[int, int]:
        model = self.model
        if self.runtime == "kernels":
            total, embedding_bytes = model.weight_bytes, model.embedding_bytes
        else:
            from edgelm.compress.quant.anyprec import AnyPrecisionLinear
            from edgelm.io.artifact import model_size

            total = int(model_size(model)["bytes"])
            # An any-precision layer stores every precision but computes with the n-bit copy it derived: a
            # token reads that copy, not the store.
            for layer in (m for m in model.modules() if isinstance(m, AnyPrecisionLinear)):
                total += layer.active.weight_q.storage_bytes - layer.storage_bytes
            embedding = model.tok_embeddings
            if isinstance(embedding, AnyPrecisionLinear):
                embedding_bytes = embedding.active.weight_q.storage_bytes
            else:
                embedding_bytes = sum(t.numel() * t.element_size() for t in embedding.state_dict().values())
        return total, bytes_read_per_token(total, embedding_bytes, model.args.vocab_size, model.args.tie_embeddings)


class _LlamaCppRunner:
    runtime = LLAMA_CPP

    def __init__(self, model_path: str, threads: int, context: int, kv_bits: int, bits: int | None = None):
        import llama_cpp

        del kv_bits, bits  # llama.cpp keeps its default float16 cache; --bits is edgelm's any-precision choice
        self.model_path = model_path
        self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=context, n_batch=LLAMA_CPP_BATCH,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False,
                                   verbose=False)
        self.get_logits_ith = llama_cpp.llama_get_logits_ith
        self.n_vocab = self.llm.n_vocab()

    def prefill(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def decode(self, token: int) -> None:
        self.llm.eval([token])

    def greedy_token(self) -> int:
        # With logits_all=False, Llama.eval leaves the logits in the context: read them there, zero-copy.
        logits = np.ctypeslib.as_array(self.get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def weight_bytes(self) -> tuple[int, int]:
        from edgelm.io.gguf import GGUFFile

        # llama.cpp computes with the GGUF tensors as stored, so its weights are the file's tensor bytes.
        gguf = GGUFFile(self.model_path)
        embedding = gguf.tensor_info("token_embd.weight")
        per_token = bytes_read_per_token(gguf.tensor_bytes, embedding.n_bytes, embedding.shape[0],
                                         tied=not gguf.has_tensor("output.weight"))
        return gguf.tensor_bytes, per_token


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Load one engine and time it (the worker's work); returns the fields of a Run it measures."""
    start = time.perf_counter()  # import + load: the runners import their engine
    runner_class = {EDGELM: _EdgelmRunner, LLAMA_CPP: _LlamaCppRunner}[job["engine"]]
    runner = runner_class(job["model_path"], job["threads"], job["context"], job["kv_bits"], job.get("bits"))
    load_s = time.perf_counter() - start

    runner.prefill(job["ttft_prompt"])  # warm-up
    runner.decode(runner.greedy_token())

    start = time.perf_counter()
    runner.prefill(job["ttft_prompt"])
    runner.greedy_token()
    ttft_s = time.perf_counter() - start

    start = time.perf_counter()
    runner.prefill(job["prompt"])
    prompt_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(job["gen_tokens"]):
        runner.decode(runner.greedy_token())
    decode_s = time.perf_counter() - start

    peak_rss = peak_rss_bytes()  # before anything below allocates
    model_bytes, per_token = runner.weight_bytes()
    return {"runtime": runner.runtime, "load_s": load_s, "ttft_s": ttft_s, "prompt_s": prompt_s, "decode_s": decode_s,
            "peak_rss_bytes": peak_rss, "model_bytes": model_bytes, "bytes_per_token": per_token}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker would report its parent's peak
    when that is higher (subprocess spawns via vfork).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _worker_main() -> int:
    try:
        result = measure(json.load(sys.stdin))
    except EdgelmError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python -m edgelm.bench.speed --worker  (a job as JSON on stdin; used by `edgelm bench`)")
    sys.exit(_worker_main())
