"""Separate a track with a stemserve Triton server using tritonclient alone (no stemserve).

The server's ``separate`` model runs the whole separation (cutting the track into
segments, the network through Triton's batcher, the overlap-add) and streams the stems
back over gRPC as each stretch is final. A client in any language with a Triton gRPC
library does the same four steps as this script: read the model's sidecar from its
config, send the mix (float32 [channels, time] at the model's rate) in one streaming
request, write each ``stems`` block ([sources, channels, n]) as it arrives, stop at the
response flagged ``triton_final_response``.

    python docs/examples/stream_separate.py song.wav separated/ --url 127.0.0.1:8001
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import tritonclient.grpc as grpcclient

MODEL = "separate"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("track", type=Path, help="a WAV or FLAC file at the model's rate")
    parser.add_argument("out", type=Path, help="folder for <stem>.wav (float32)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC address")
    parser.add_argument("--shifts", type=int, default=0, help="demucs' shift trick")
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(args.url)
    config = client.get_model_config(MODEL, as_json=True)["config"]
    sidecar = json.loads(json.loads(
        config["parameters"]["stemserve_specs"]["string_value"])[0])
    rate, sources = sidecar["sample_rate"], sidecar["sources"]

    mix, file_rate = sf.read(str(args.track), dtype="float32", always_2d=True)
    if file_rate != rate:
        print(f"{args.track} is at {file_rate} Hz; the model takes {rate} Hz: resample it "
              f"first (ffmpeg -i {args.track} -ar {rate} in.wav)", file=sys.stderr)
        return 1
    mix = np.ascontiguousarray(mix.T)
    if mix.shape[0] == 1:
        mix = np.repeat(mix, sidecar["audio_channels"], axis=0)  # mono: as demucs does
    inputs = [grpcclient.InferInput(sidecar.get("input_name", "mix"), list(mix.shape), "FP32"),
              grpcclient.InferInput("shifts", [1], "INT32")]
    inputs[0].set_data_from_numpy(mix)
    inputs[1].set_data_from_numpy(np.array([args.shifts], np.int32))

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {name: sf.SoundFile(str(args.out / f"{name}.wav"), "w", rate, mix.shape[0],
                                subtype="FLOAT") for name in sources}
    try:
        while True:
            result, error = answers.get()
            if error is not None:
                print(f"the server failed: {error}", file=sys.stderr)
                return 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            stems = result.as_numpy("stems")  # the next block of every stem
            for index, name in enumerate(sources):
                files[name].write(stems[index].T)
    finally:
        client.stop_stream()
        for file in files.values():
            file.close()
    print(", ".join(str(args.out / f"{name}.wav") for name in sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
