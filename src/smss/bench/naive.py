"""A container-style start, for comparison: a new interpreter that imports torch,
builds the model, loads its weights from the safetensors file, and answers one
request over a Unix socket (SMSS's own frame format), then exits.

``python -m smss.bench.naive SOURCE.py CLASS WEIGHTS SOCKET [DEVICE]``: with a
``DEVICE`` (``cuda:0``) the weights are loaded from the file onto that GPU, so the
start pays CUDA's initialisation too (:mod:`smss.bench.gpusharing`).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


async def _serve_once(model: object, socket_path: str) -> None:
    from smss.node import ipc

    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message, payload = await ipc.read_frame(reader)
        assert isinstance(message, ipc.Infer)
        outputs = model.predict(ipc.unpack_tensors(message.inputs, payload))  # type: ignore[attr-defined]
        metas, buffers = ipc.tensor_metas(outputs)
        ipc.write_frame(writer, ipc.Result(message.id, metas), buffers)
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_unix_server(handle, path=socket_path)
    print("listening", flush=True)
    await done.wait()
    server.close()


def main() -> None:
    source, class_name, weights, socket_path = sys.argv[1:5]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    import torch  # the cost a container pays on every start

    torch.set_num_threads(1)
    from smss.node.weights import Weights
    from smss.packaging import load_class

    _, cls = load_class(f"{source}:{class_name}")
    model = cls()
    model.load(Weights(Path(weights), "safetensors", device=device))
    asyncio.run(_serve_once(model, socket_path))


if __name__ == "__main__":
    main()
