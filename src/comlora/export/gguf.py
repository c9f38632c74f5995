"""GGUF exports for llama.cpp (and Ollama, LM Studio): a LoRA adapter file, and a merged model file.

LoRA adapter, as llama.cpp's ``convert_lora_to_gguf.py`` writes it: general.architecture (the base's),
general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha, and for each adapted weight
W [d_out, d_in], named as in the base GGUF (gguf's TensorNameMap: model.layers.3.self_attn.q_proj ->
blk.3.attn_q.weight), the tensors NAME.lora_a = A [r, d_in] and NAME.lora_b = B [d_out, r] (numpy order; ggml's
ne is the reverse). llama.cpp computes W x + (alpha / r) B (A x).

Llama's attn_q / attn_k rows are stored permuted in GGUF (``rotary_permute``, convert_hf_to_gguf's
LlamaModel.permute): P (W + s B A) = P W + s (P B) A, so B's rows get the same permutation and A none, as
convert_lora_to_gguf does.

Merged model: the base GGUF file rewritten, every metadata key and tensor copied, each adapted tensor replaced by
dequantize(P W0) + s (P B) A in the requested type. It needs the GGUF file the base weights came from (the
embedded default is one); other bases merge to a transformers folder, which llama.cpp's convert_hf_to_gguf.py
converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np
import torch

from comlora.methods.base import LoraWeight
from comlora.provenance import base_gguf_file, base_model_record, read_gguf
from comlora.storage import atomic_write

ADAPTER_OUTTYPES = ("f32", "f16")
MERGED_OUTTYPES = ("f16", "f32", "q8_0")
QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "q8_0": gguf.GGMLQuantizationType.Q8_0}
# transformers config.model_type -> (llama.cpp architecture, whether its converter permutes the q/k rows):
# LlamaModel (llama, mistral) permutes, Qwen2Model / Qwen3Model do not.
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
                 "qwen2": (gguf.MODEL_ARCH.QWEN2, False), "qwen3": (gguf.MODEL_ARCH.QWEN3, False)}
# The base GGUF must hold the weights training saw: dequantized, within this fraction of the tensor's largest
# magnitude (0 for the default; bfloat16 training rounds to 0.4%; another model differs by ~100%).
BASE_TOLERANCE = 1e-2


def rotary_permute(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k: within each head, row 2j + h = transformers' row h * head_dim/2 + j."""
    return (rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
            .transpose(1, 2).reshape(rows.shape))


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp names and lays out the weights of a transformers model (from its config)."""

    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def from_config(cls, config) -> GgufLayout:
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"GGUF export supports the transformers model types {', '.join(ARCHITECTURES)}, "
                             f"not {model_type!r}")
        arch, permute = ARCHITECTURES[model_type]
        heads = config.num_attention_heads
        return cls(model_type, arch, permute, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @cached_property
    def name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch, self.num_layers)

    def tensor(self, module: str) -> tuple[gguf.MODEL_TENSOR, str]:
        """(kind, GGUF weight name) of a transformers module, from gguf's own name map."""
        found = self.name_map.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None:
            raise ValueError(f"{module}: llama.cpp's {self.arch_name} architecture has no tensor for this module")
        return found

    def to_gguf_rows(self, module: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [d_out, ...] of ``module``'s weight in the order llama.cpp stores them."""
        kind, _ = self.tensor(module)
        if self.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            return rotary_permute(rows, self.num_heads)
        if self.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            return rotary_permute(rows, self.num_kv_heads)
        return rows


def adapted_weights(method, component: int | None = None) -> tuple[list[LoraWeight], float, str]:
    """(every adapted layer, lora_alpha, a label) of the method's ``component`` (default: the winner), from its
    ``lora_weights`` hook: methods that keep their own modules at inference have no LoRA form and refuse."""
    weights = method.lora_weights(component)
    return weights, float(method.config.lora_alpha), method.component_name(component)


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict) -> None:
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))


def write_lora_gguf(path: str | Path, weights: list[LoraWeight], lora_alpha: float, layout: GgufLayout,
                    metadata: dict | None = None, outtype: str = "f32") -> Path:
    """The LoRA adapter file llama.cpp loads on the base GGUF (``llama-cli -m BASE.gguf --lora FILE``).

    llama.cpp scales every pair by lora_alpha / r; a layer whose own scale differs has it folded into B.
    """
    if outtype not in ADAPTER_OUTTYPES:
        raise ValueError(f"a GGUF LoRA adapter is written as {' or '.join(ADAPTER_OUTTYPES)}, not {outtype!r}")
    dtype = np.float32 if outtype == "f32" else np.float16

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, layout.arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha)
        _add_metadata(writer, metadata or {})
        for w in weights:
            _, name = layout.tensor(w.module)
            rank = w.A.shape[0]
            B = w.B.detach().double() * (w.scale * rank / lora_alpha)
            writer.add_tensor(name + ".lora_a", w.A.detach().float().cpu().numpy().astype(dtype))
            writer.add_tensor(name + ".lora_b", layout.to_gguf_rows(w.module, B).float().cpu().numpy().astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return Path(path)


def _field_value(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def check_base_gguf(reader: gguf.GGUFReader, layout: GgufLayout, source: str) -> None:
    """The base GGUF file has the architecture, layer and head counts of the model the run trained."""
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != layout.arch_name:
        raise ValueError(f"{source} is a {arch!r} model; the run's base is {layout.arch_name!r}")
    expected = {gguf.Keys.LLM.BLOCK_COUNT: layout.num_layers, gguf.Keys.Attention.HEAD_COUNT: layout.num_heads,
                gguf.Keys.Attention.HEAD_COUNT_KV: layout.num_kv_heads}
    for key, value in expected.items():
        found = _field_value(reader, key.format(arch=arch))
        if found is not None and found != value:
            raise ValueError(f"{source}: {key.format(arch=arch)} = {found}, the run's base has {value}")


def _encode(values: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``values`` as ``outtype``; a q8_0 tensor whose rows are not a multiple of 32 long is written as f16
    instead (as convert_hf_to_gguf does)."""
    if outtype == "q8_0" and values.shape[-1] % gguf.GGML_QUANT_SIZES[QUANT_TYPES["q8_0"]][0] == 0:
        return gguf.quants.quantize(values.astype(np.float32), QUANT_TYPES["q8_0"]), QUANT_TYPES["q8_0"]
    if outtype == "f32":
        return values.astype(np.float32), QUANT_TYPES["f32"]
    return values.astype(np.float16), QUANT_TYPES["f16"]


def write_merged_gguf(base_path: str | Path, path: str | Path, weights: list[LoraWeight], layout: GgufLayout,
                      metadata: dict | None = None, outtype: str = "f16", whole_model: bool = False) -> dict[str, str]:
    """The base GGUF with W = dequantize(W0) + scale * B @ A (rows in llama.cpp's order) in each adapted tensor,
    written as ``outtype``; every other tensor and every metadata key copied unchanged (``metadata`` added,
    general.name extended), or with ``whole_model`` every other quantized tensor dequantized and written as
    ``outtype`` too (no quantized tensor left). Returns the type written for each adapted tensor.

    Each adapted tensor of the file must equal the weights training saw (within BASE_TOLERANCE): otherwise the
    run was not trained on this file.
    """
    if outtype not in MERGED_OUTTYPES:
        raise ValueError(f"a merged GGUF model is written as one of {', '.join(MERGED_OUTTYPES)}, not {outtype!r}")
    base_path = Path(base_path)
    reader = read_gguf(base_path)
    check_base_gguf(reader, layout, base_path.name)
    tensors = {t.name: t for t in reader.tensors}
    merged, written = {}, {}
    for w in weights:
        _, name = layout.tensor(w.module)
        if name not in tensors:
            raise ValueError(f"{base_path.name} has no tensor {name} (the run adapted {w.module})")
        t = tensors[name]
        w0 = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        trained = layout.to_gguf_rows(w.module, w.base.detach().double().cpu()).numpy()
        if w0.shape != trained.shape:
            raise ValueError(f"{base_path.name}: {name} is {list(w0.shape)}, "
                             f"the run's {w.module} is {list(trained.shape)}")
        gap = float(np.abs(w0 - trained).max())
        if gap > BASE_TOLERANCE * float(np.abs(w0).max()):
            raise ValueError(f"{base_path.name}: {name} differs from the weights the run trained on (max |diff| "
                             f"{gap:.3g}): the run was not trained on this file")
        merged[name] = _encode(w0 + layout.to_gguf_rows(w.module, w.delta().cpu()).numpy(), outtype)
        written[name] = merged[name][1].name
    if whole_model:
        for t in reader.tensors:
            if t.name not in merged and t.tensor_type not in (QUANT_TYPES["f32"], QUANT_TYPES["f16"]):
                merged[t.name] = _encode(gguf.quants.dequantize(t.data, t.tensor_type), outtype)
    name_key = gguf.Keys.General.NAME
    new_name = f"{_field_value(reader, name_key) or base_path.stem} + {(metadata or {}).get('general.name', 'adapter')}"

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, layout.arch_name)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue          # written by GGUFWriter itself
            value = new_name if field.name == name_key else field.contents()
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
        if reader.get_field(name_key) is None:
            writer.add_name(new_name)
        _add_metadata(writer, {k: v for k, v in (metadata or {}).items() if k != name_key})
        for t in reader.tensors:
            if t.name in merged:
                data, qtype = merged[t.name]
                writer.add_tensor(t.name, data, raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type, tensor_endianess=reader.endianess)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return written


def export_metadata(record: dict, run: str | Path, method: str, label: str) -> dict:
    """GGUF metadata naming what was exported and the base weights it belongs to (``comlora.*`` keys)."""
    values = {"general.name": f"{Path(run).name} {label}", "comlora.run": Path(run).name, "comlora.method": method,
              "comlora.exported": label}
    values.update({f"comlora.base_model.{key}": value for key, value in record["base_model"].items()})
    return values


def export_run_gguf(run: str | Path, out: str | Path, component: int | None = None, merge: bool = False,
                    outtype: str | None = None) -> str:
    """``comlora export RUN --format gguf``: the winner (or ``component``) of a ComLoRA run, or a plain LoRA run,
    as a GGUF LoRA adapter, or with ``merge`` as a standalone GGUF model. Returns a one-line summary."""
    from comlora.training.finished_run import reload_method

    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: a GGUF export is one file; name it FILE.gguf")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (nothing was written)")
    allowed = MERGED_OUTTYPES if merge else ADAPTER_OUTTYPES
    if outtype is not None and outtype not in allowed:
        raise ValueError(f"--outtype {outtype}: a {'merged model' if merge else 'LoRA adapter'} is written as one of "
                         f"{', '.join(allowed)}")
    method, _, cfg = reload_method(run, device="cpu")
    weights, alpha, label = adapted_weights(method, component)
    layout = GgufLayout.from_config(method.model.config)
    metadata = export_metadata(base_model_record(cfg.model), run, cfg.method, label)
    base = base_gguf_file(cfg.model)
    if merge:
        if base is None:
            raise ValueError(f"--merge --format gguf rewrites the base's GGUF file, and the base {cfg.model!r} did not "
                             "come from one (the default smollm2-135m does): write the merged transformers model "
                             "(comlora export RUN --merge --out DIR) and convert it with llama.cpp's "
                             "convert_hf_to_gguf.py")
        types = write_merged_gguf(base, out, weights, layout, metadata, outtype or "f16")
        kinds = ", ".join(sorted(set(types.values())))
        return f"exported {label} merged into {base.name} ({len(types)} tensors now {kinds}) -> {out}"
    if base is not None:
        reader = read_gguf(base)
        check_base_gguf(reader, layout, base.name)
        present = {t.name for t in reader.tensors}
        missing = [name for _, name in (layout.tensor(w.module) for w in weights) if name not in present]
        if missing:
            raise ValueError(f"{base.name} has no tensors {missing[:3]}: llama.cpp could not apply this adapter to it")
    write_lora_gguf(out, weights, alpha, layout, metadata, outtype or "f32")
    where = f" (base: {base.name})" if base is not None else ""
    return f"exported {label} as a GGUF LoRA adapter{where} -> {out}"
