"""Environment report behind ``pacofr info``: versions, device, and which backends work."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

import pacofr
from pacofr import _extension, _triton
from pacofr.ops import _dispatch


#: the first line ``pacofr info`` prints for each :func:`pacofr._extension.load_state`
_EXTENSION_STATES = {
    _extension.NOT_BUILT: "not built (this install has no CUDA backend)",
    _extension.LOAD_FAILED: "built, but fails to load here",
    _extension.LOADED: "built for {arches}",
}


def _device_report() -> tuple[torch.device, dict[str, Any]]:
    if not torch.cuda.is_available():
        return torch.device("cpu"), {"type": "cpu", "name": platform.processor() or platform.machine(),
                                     "cuda_available": False}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return torch.device("cuda", index), {
        "type": "cuda",
        "index": index,
        "name": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "cuda_available": True,
    }


def collect_info() -> dict[str, Any]:
    """Everything ``pacofr info`` prints, as a JSON-serialisable dict."""
    device, device_info = _device_report()
    ext_ok, ext_why = _extension.status()
    cuda_ext: dict[str, Any] = {"loaded": ext_ok, "state": _extension.load_state(), "detail": ext_why,
                                "compiled_arches": _extension.compiled_arches()}
    if ext_ok and device.type == "cuda":
        cuda_ext["runs_on_device"], cuda_ext["device_detail"] = _extension.kernel_image_status(device.index or 0)
    backends = {}
    for name in _dispatch.BACKENDS:
        ok, why = _dispatch.backend_status(name, device)
        backends[name] = {"available": ok, "detail": why}
    ops = {}
    for op_name, op in sorted(_dispatch.registered_ops().items()):
        ops[op_name] = {
            "implemented": sorted(op.impls),
            "auto": op.implementation("auto", [torch.empty(0, device=device)])[0],
        }
    return {
        "pacofr": pacofr.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton.version(),
        "triton_interpreter": _triton.interpreter_enabled(),
        "requested_backend": _dispatch.requested_backend("auto"),
        "device": device_info,
        "cuda_extension": cuda_ext,
        "backends": backends,
        "ops": ops,
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect_info`."""
    dev = info["device"]
    if dev["type"] == "cuda":
        device_line = (f"{dev['name']} ({dev['capability']}, {dev['multiprocessors']} SMs, "
                       f"{dev['memory_gib']} GiB), {dev['count']} visible")
    else:
        device_line = f"CPU only ({dev['name']}); torch sees no CUDA device"
    ext = info["cuda_extension"]
    arches = ", ".join(ext["compiled_arches"]) or "-"
    lines = [
        f"pacofr            {info['pacofr']}",
        f"python            {info['python']} ({info['platform']})",
        f"torch             {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"triton            {info['triton'] or 'not importable'}"
        + ("  [interpreter: TRITON_INTERPRET=1]" if info["triton_interpreter"] else ""),
        f"device            {device_line}",
        f"pacofr._C         {_EXTENSION_STATES[ext['state']].format(arches=arches)}",
    ]
    if "runs_on_device" in ext:
        verdict = "yes" if ext["runs_on_device"] else "NO"
        lines.append(f"  runs on this GPU: {verdict} ({ext['device_detail']})")
    elif not ext["loaded"]:
        lines.append(f"  {ext['detail']}")
    lines.append(f"backend request   {info['requested_backend']} (argument > use_backend() > PACOFR_BACKEND > auto)")
    lines.append("backends on this device:")
    for name, b in info["backends"].items():
        lines.append(f"  {name:<7} {'yes' if b['available'] else 'no ':<4} {b['detail']}")
    if info["ops"]:
        lines.append("ops (implemented backends; what auto picks here):")
        for name, op in info["ops"].items():
            lines.append(f"  {name:<22} {', '.join(op['implemented']):<20} auto -> {op['auto']}")
    return "\n".join(lines)
