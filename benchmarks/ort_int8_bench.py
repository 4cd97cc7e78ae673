"""Which INT8 scheme ONNX Runtime should get on this CPU: FP32 against static INT8 (QDQ,
per-channel, symmetric weights) as u8×s8, u8×s8 with 7-bit weights (reduced range, what export
writes), s8×s8, u8×u8 (weights with zero point 128), export's graph (the reduced one with its
stem rewritten as a space-to-depth, ``onnx_export.stem_to_space_to_depth``), that graph with its
GEMM patch appended (``onnx_export.gemm_patch``: the weight zero points of the large
convolutions become graph inputs, so ONNX Runtime runs those convolutions through its general
u8×s8 QGEMM, the one with an AMX kernel, instead of its symmetric kernels; what the server does
on a CPU with AMX), the reduced graph with that patch (the stem not rewritten), and with the
patch over every convolution; each timed in-process at batch 1, 4 and 8 (in five rounds, the
models in turn, so the host's drift weighs on all alike) with agreement against FP32 on the
calibration photos. Then the kernel alone: a u8×s8 ``MatMulInteger`` of the shape of the last
stage's 3×3 convolutions at batch 8 (M 392, K 4608, N 512) on one thread, in GMAC/s: what ONNX
Runtime's u8×s8 QGEMM does where its convolutions do not go through it.

    python benchmarks/ort_int8_bench.py [--repeats 20] [--threads 2] [--deny-amx]

On x86, ONNX Runtime multiplies u8×s8 with VNNI (vpdpbusd) where the CPU has it (AVX512-VNNI or
AVX-VNNI); without it, with AVX2's vpmaddubsw, which saturates on large products: the reduced
range avoids that at a small cost in precision. s8×s8 has no fast path without VNNI.
``--deny-amx`` refuses this process the kernel's permission to use AMX tiles (a seccomp filter
on ``arch_prctl``), so ONNX Runtime runs as on a CPU with AVX-512 VNNI and no AMX: how the GEMM
patch would do where the server does not apply it. Writes
``benchmarks/results/ort_int8_bench.{json,md}`` with the machine's instruction sets.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402

SCHEMES = {  # name: (activations, weights, reduced range)
    "u8s8": ("QUInt8", "QInt8", False),
    "u8s8 reduced": ("QUInt8", "QInt8", True),
    "s8s8": ("QInt8", "QInt8", False),
    "u8u8 (weights zero point 128)": ("QUInt8", "QUInt8", False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ort_int8_bench")
    parser.add_argument("--deny-amx", action="store_true", help="run as on a CPU without AMX (see above)")
    args = parser.parse_args(argv)
    if args.deny_amx:
        deny_amx()
    # ONNX Runtime and oneDNN look for AMX when they load: after the filter, never before
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend
    from resnet_serve.backends.torch.checkpoints import random_init
    from resnet_serve.backends.torch.onnx_export import (
        GEMM_MIN_INPUTS,
        _head,
        _Photos,
        export_onnx,
        gemm_patch,
        stem_to_space_to_depth,
    )
    from resnet_serve.photos import calibration_files, load_pixels
    from resnet_serve.spec import RESNET18

    pixels = load_pixels(calibration_files(None), RESNET18)

    def samples(backend: OnnxRuntimeBackend, batch: int, count: int) -> list[float]:
        x = np.resize(pixels, (batch, *pixels.shape[1:]))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            backend.run(x)
            times.append(time.perf_counter() - start)
        return times

    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        fp32 = export_onnx(RESNET18, random_init(RESNET18), folder / "fp32.onnx")
        quant_pre_process(str(fp32), str(folder / "prepared.onnx"))
        import onnx

        head = _head(onnx.load(str(folder / "prepared.onnx")).graph)
        models = {"fp32": fp32}
        for name, (activations, weights, reduced) in SCHEMES.items():
            models[name] = folder / f"{activations}-{weights}-{reduced}.onnx"
            quantize_static(str(folder / "prepared.onnx"), str(models[name]), _Photos(pixels),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduced,
                            activation_type=getattr(QuantType, activations), weight_type=getattr(QuantType, weights),
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head,
                            extra_options={"WeightSymmetric": True})
        reduced = onnx.load(str(models["u8s8 reduced"]))
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(reduced)
        stem_to_space_to_depth(rewritten)
        models[EXPORTS] = export = folder / "export.onnx"
        onnx.save(rewritten, str(export))
        patched = {"export's + GEMM patch (served so on AMX)": GEMM_MIN_INPUTS, "GEMM patch, every convolution": 0}
        for name, least in patched.items():
            models[name] = folder / f"patched-{least}.onnx"
            models[name].write_bytes(export.read_bytes() + base64.b64decode(gemm_patch(rewritten, least)))
        models[STEM_AS_IS] = folder / "patched-stem-as-is.onnx"
        models[STEM_AS_IS].write_bytes(models["u8s8 reduced"].read_bytes() + base64.b64decode(gemm_patch(reduced)))
        reference = OnnxRuntimeBackend(fp32, threads=args.threads).run(pixels)
        backends = {name: OnnxRuntimeBackend(path, threads=args.threads) for name, path in models.items()}
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in models}
        for backend in backends.values():
            for batch in BATCHES:
                samples(backend, batch, 3)
        for _ in range(ROUNDS):  # interleaved, so the host's drift weighs on every model alike
            for name, backend in backends.items():
                for batch in BATCHES:
                    times[name][batch] += samples(backend, batch, max(1, args.repeats // ROUNDS))
        answers = {}
        for name, backend in backends.items():
            answers[name] = probs = backend.run(pixels)
            rows[name] = {**{f"b{b}_ms": round(statistics.median(times[name][b]) * 1000, 2) for b in BATCHES},
                          "top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
                          "max_abs_diff": float(np.abs(probs - reference).max())}
        same = ["u8s8 reduced", STEM_AS_IS, *patched]  # the same weights and zero points through other kernels
        for name in same:
            rows[name]["max_abs_diff_vs_export"] = float(np.abs(answers[name] - answers[EXPORTS]).max())
    lines = ["| model | batch 1 ms | batch 4 ms | batch 8 ms | img/s at 8 | top-1 vs FP32 | max abs Δp |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['b1_ms']} | {r['b4_ms']} | {r['b8_ms']} | {round(8000 / r['b8_ms'], 1)} | "
              f"{r['top1_agreement']:.0%} | {r['max_abs_diff']:.1e} |" for n, r in rows.items()]
    lines += ["", "Against export's graph, max abs Δp: " + ", ".join(
        f"{n} {rows[n]['max_abs_diff_vs_export']:.1e}" for n in same)]
    kernel = {"matmulinteger_u8s8_1thread_gmacs": qgemm_gmacs(args.repeats)}
    lines += ["", f"u8×s8 MatMulInteger, M {QGEMM_SHAPE[0]} K {QGEMM_SHAPE[1]} N {QGEMM_SHAPE[2]}, one thread: "
              f"{kernel['matmulinteger_u8s8_1thread_gmacs']} GMAC/s"]
    amx = "AMX denied to the process, " if args.deny_amx else ""
    publish(RESULTS / args.out, lines, f"ONNX Runtime {ort.__version__}, {args.threads} threads, {amx}random-init "
            f"ResNet-18 ({len(pixels)} photos; agreement on random weights says little)", {"rows": rows, **kernel})
    return 0


BATCHES = (1, 4, 8)
ROUNDS = 5  # each model timed in this many rounds, the models in turn within each
EXPORTS = "u8s8 reduced, stem as space-to-depth (export's)"
STEM_AS_IS = "u8s8 reduced + GEMM patch (the stem as it was)"
QGEMM_SHAPE = (392, 4608, 512)  # the last stage's 3×3 convolutions at batch 8, as a GEMM


def qgemm_gmacs(repeats: int) -> float:
    """ONNX Runtime's u8×s8 QGEMM alone (the kernel its AMX path lives in), one thread: GMAC/s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = QGEMM_SHAPE
    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "w"),
                 numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
                 numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"])], "qgemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], constants)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {"a": a})
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - start)
    return round(m * k * n / statistics.median(times) / 1e9, 1)


def deny_amx() -> None:
    """From now on, this process's ``arch_prctl`` calls that ask for (or about) AMX permission
    fail with EPERM: libraries that check before using AMX tiles (ONNX Runtime's MLAS, oneDNN)
    fall back to their AVX-512 kernels. Linux x86-64 only; for this process and its children."""
    import ctypes

    from resnet_serve.backends import ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL  # no runtime loaded

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    load, jump_if, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050001  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    code = [Instruction(load, 0, 0, 0),  # the syscall number
            Instruction(jump_if, 0, 4, SYS_ARCH_PRCTL),
            Instruction(load, 0, 0, 16),  # its first argument
            Instruction(jump_if, 1, 0, ARCH_GET_XCOMP_PERM),
            Instruction(jump_if, 0, 1, ARCH_REQ_XCOMP_PERM),
            Instruction(ret, 0, 0, eperm),
            Instruction(ret, 0, 0, allow)]
    program = Program(len(code), (Instruction * len(code))(*code))
    libc = ctypes.CDLL(None, use_errno=True)
    no_new_privs, set_seccomp, filter_mode = 38, 22, 2  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    if libc.prctl(no_new_privs, 1, 0, 0, 0) or libc.prctl(set_seccomp, filter_mode, ctypes.byref(program), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter that denies AMX")


if __name__ == "__main__":
    raise SystemExit(main())
