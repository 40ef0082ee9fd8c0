"""Can HTDemucs (demucs v4) be exported to ONNX, and at what cost? A feasibility probe.

    python -m benchmarks.htdemucs_export_probe            # full htdemucs, 2 threads
    python -m benchmarks.htdemucs_export_probe --repeats 3 \
        --out benchmarks/results/htdemucs-export-probe.md

``torch.onnx`` cannot export ``torch.stft``'s complex output. Two ways around it, on the
same random-weight htdemucs (the released configuration, 42 M parameters) and the same
input, one training segment (343,980 samples, 7.8 s) per item:

(a) ``graph-stft``: STFT and iSTFT inside the graph as real matrix products, one
    Cooley-Tukey step per frame (:class:`stemserve.export.exportable.HybridGraphSTFT`):
    mix in, stems out.
(b) ``core``: the STFT outside the graph (:class:`~stemserve.export.exportable.
    HTDemucsCore`): mix and spectrogram in, both branches out; the client does the STFT,
    the iSTFT and the sum with torch (timed separately as ``client``).

Each is exported with opset 17, the TorchScript exporter (``dynamo=False``) and a dynamic
batch axis; ONNX Runtime (CPU, ``--threads`` intra-op threads) runs it at batch 1 and 2
(batch 2 also checks the dynamic axis). The error is the largest absolute difference of
the stems from PyTorch eager ``HTDemucs.forward`` on the same input. Times are the best
of ``--repeats`` runs after one warm-up (the machine may be shared). ``--out`` also
writes the markdown table to a file.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def _best_time(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up (robust to a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _random_model(seed: int):
    from stemserve.models import HTDemucs
    from stemserve.models.configs import HTDEMUCS

    torch.manual_seed(seed)
    model = HTDemucs(**HTDEMUCS)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # perturb everything (norms, LayerScales too)
            std = param.std().item() if param.numel() > 1 else 0.
            param.add_((0.5 * std if std > 0 else 0.05)
                       * torch.randn(param.shape, generator=generator))
    return model.eval()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def probe(threads: int, repeats: int, workdir: Path) -> tuple[list[dict], dict]:
    import onnx
    import onnxruntime as ort

    from stemserve.export.exportable import (HybridGraphSTFT, HTDemucsCore,
                                             htdemucs_from_core, htdemucs_spec)

    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    model = _random_model(seed=0)
    length = model.training_length
    mix = torch.randn(2, model.audio_channels, length, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(mix)
        torch_times = {b: _best_time(lambda b=b: model(mix[:b]), repeats) for b in (1, 2)}
        wrapper_error = (HybridGraphSTFT(model)(mix) - expected).abs().max().item()
    info = dict(params=sum(p.numel() for p in model.parameters()), length=length,
                torch_times=torch_times, wrapper_error=wrapper_error,
                output_scale=expected.abs().max().item())

    with torch.no_grad():
        spec = htdemucs_spec(model, mix)
        # The STFT front and iSTFT back ends alone, batch 1, in PyTorch eager.
        graph = HybridGraphSTFT(model)
        freq_out = torch.randn(1, len(model.sources), *spec.shape[1:])
        info["ends_torch"] = _best_time(lambda: (htdemucs_spec(model, mix[:1]), model._ispec(
            model._mask(None, freq_out), length)), repeats)
        info["ends_graph"] = _best_time(
            lambda: (graph.spec(mix[:1]), graph.ispec(graph.mask(None, freq_out), length)),
            repeats)

    ways = {
        "(a) graph-stft": (HybridGraphSTFT(model).eval(), ["mix"], ["stems"]),
        "(b) core": (HTDemucsCore(model).eval(), ["mix", "spec"], ["freq", "time"]),
    }
    rows = []
    for name, (module, inputs, outputs) in ways.items():
        row: dict = {"way": name}
        rows.append(row)
        path = workdir / f"{name.split()[-1]}.onnx"
        args = (mix[:1],) if len(inputs) == 1 else (mix[:1], spec[:1])
        start = time.perf_counter()
        try:
            torch.onnx.export(module, args, str(path), opset_version=17, dynamo=False,
                              input_names=inputs, output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in inputs + outputs})
        except Exception as err:  # noqa: BLE001 (the probe reports any failure)
            row["export"] = f"fails: {type(err).__name__}: {str(err)[:200]}"
            continue
        row["export"] = f"ok ({time.perf_counter() - start:.0f} s)"
        row["size_mb"] = path.stat().st_size / 1e6
        graph = onnx.load(str(path), load_external_data=False).graph
        row["nodes"] = len(graph.node)
        row["ops"] = sorted({node.op_type for node in graph.node})

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(batch: int, session=session, inputs=inputs):
            feeds = {"mix": mix[:batch].numpy()}
            if "spec" in inputs:
                feeds["spec"] = spec[:batch].numpy()
            return session.run(None, feeds)

        got = [torch.from_numpy(out) for out in run(2)]
        if "spec" in inputs:
            with torch.no_grad():
                stems = htdemucs_from_core(model, *got)
        else:
            stems = got[0]
        row["error"] = (stems - expected).abs().max().item()
        for batch in (1, 2):
            row[f"ort_b{batch}"] = _best_time(lambda batch=batch: run(batch), repeats)
        if "spec" in inputs:
            freq, time_out = (torch.from_numpy(out) for out in run(1))
            with torch.no_grad():
                row["client_b1"] = _best_time(
                    lambda: (htdemucs_spec(model, mix[:1]),
                             htdemucs_from_core(model, freq, time_out)), repeats)
        del session
    info["load"] = (load_before, os.getloadavg()[0])
    return rows, info


def render(rows: list[dict], info: dict, threads: int, repeats: int) -> str:
    import onnxruntime as ort

    seconds = info["length"] / 44100
    lines = [
        "# HTDemucs ONNX export probe",
        "",
        "Generated by `python -m benchmarks.htdemucs_export_probe` (see its docstring).",
        "",
        f"- model: htdemucs configuration ({info['params'] / 1e6:.1f} M parameters, random "
        f"weights), one segment = {info['length']:,} samples ({seconds:.1f} s) stereo per item",
        f"- machine: {_cpu_name()}, {threads} threads (torch and ONNX Runtime intra-op); "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, opset 17, `dynamo=False`",
        f"- times: best of {repeats} run(s) after one warm-up, seconds per call; 1-minute "
        f"load average {info['load'][0]:.1f} before, {info['load'][1]:.1f} after",
        f"- PyTorch eager `HTDemucs.forward` (torch.stft): batch 1 "
        f"{info['torch_times'][1]:.2f} s, batch 2 {info['torch_times'][2]:.2f} s",
        f"- in-graph STFT vs torch.stft, both in PyTorch: max abs error "
        f"{info['wrapper_error']:.1e} on stems up to {info['output_scale']:.2f}",
        f"- STFT + iSTFT alone (batch 1, PyTorch eager): torch.stft/istft "
        f"{info['ends_torch']:.2f} s, in-graph matrix-product DFTs {info['ends_graph']:.2f} s",
        "",
        "| way | export | graph MB | nodes | ORT vs PyTorch max abs error | ORT batch 1 (s) "
        "| ORT batch 2 (s) | ORT s per segment (batch 2) | client STFT+iSTFT, batch 1 (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "size_mb" not in row:
            lines.append(f"| {row['way']} | {row['export']} | | | | | | | |")
            continue
        client = f"{row['client_b1']:.2f}" if "client_b1" in row else "in graph"
        lines.append(
            f"| {row['way']} | {row['export']} | {row['size_mb']:.0f} | {row['nodes']} | "
            f"{row['error']:.1e} | {row['ort_b1']:.2f} | {row['ort_b2']:.2f} | "
            f"{row['ort_b2'] / 2:.2f} | {client} |")
    lines.append("")
    for row in rows:
        if "ops" in row:
            lines.append(f"- {row['way']} operators: {', '.join(row['ops'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="htdemucs-probe-") as tmp:
        rows, info = probe(args.threads, args.repeats, Path(tmp))
    text = render(rows, info, args.threads, args.repeats)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
