"""Which states of which models to compare: the layer map, widths, and the attention projections of a block, with
the checks that need the loaded models (one line each, naming the models' layer counts)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from potstill import runtime


def block_count(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def width(model) -> int:
    return model.config.get_text_config().hidden_size


def _range_error(key: str, i: int, pair, who: str, index: int, count: int) -> ValueError:
    return ValueError(f"{key} pair {i} {list(pair)}: {who} layer {index} is out of range (the {who} has {count} blocks: "
                      f"0 = embeddings .. {count} = final state)")


def resolve_layer_map(layers, pairs: int, student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices: explicit pairs checked against the block counts, or ``uniform``:
    N pairs (k·L_s // N, k·L_t // N), k = 1..N (N = ``pairs``, 0 = min(L_s, L_t))."""
    if layers != "uniform":
        for i, (s, t) in enumerate(layers):
            if s > student_blocks:
                raise _range_error("hidden.layers", i, (s, t), "student", s, student_blocks)
            if t > teacher_blocks:
                raise _range_error("hidden.layers", i, (s, t), "teacher", t, teacher_blocks)
        return [(int(s), int(t)) for s, t in layers]
    most = min(student_blocks, teacher_blocks)
    n = pairs or most
    if n > most:
        raise ValueError(f"hidden.pairs={n}: at most {most} uniform pairs (the student has {student_blocks} blocks, "
                         f"the teacher {teacher_blocks})")
    return [(k * student_blocks // n, k * teacher_blocks // n) for k in range(1, n + 1)]


def decoder_blocks(model) -> list[nn.Module]:
    """The decoder blocks in order (the ones FSDP2 shards one by one)."""
    blocks = runtime._blocks(model)
    if len(blocks) != block_count(model):
        raise NotImplementedError(f"{type(model).__name__}: found {len(blocks)} decoder blocks for "
                                  f"{block_count(model)} layers; hidden.attention_relations cannot find its blocks")
    return blocks


@dataclass(frozen=True)
class AttentionSite:
    """The q/k/v projection modules (in ``relations`` order) of one decoder block."""

    block: int  # 1-based
    modules: tuple[nn.Module, ...]


def attention_site(model, block: int, relations: list[str], who: str) -> AttentionSite:
    """Block ``block``'s q_proj / k_proj / v_proj (Llama, Qwen2, Mistral and most decoders name them so)."""
    count = block_count(model)
    if not 1 <= block <= count:
        raise ValueError(f"hidden.attention_relations.layers: {who} block {block} is out of range (the {who} has "
                         f"{count} blocks, numbered 1..{count})")
    found = {}
    for name, module in decoder_blocks(model)[block - 1].named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj") and hasattr(module, "out_features"):  # nn.Linear or a LoRA layer
            found[leaf[0]] = module
    missing = [f"{x}_proj" for x in relations if x not in found]
    if missing:
        raise NotImplementedError(f"hidden.attention_relations: the {who} ({type(model).__name__}) has no "
                                  f"{', '.join(missing)} module in block {block}; relations need separate "
                                  "q/k/v projections (Llama, Qwen2, Mistral, ...)")
    return AttentionSite(block, tuple(found[x] for x in relations))


def check_relation_heads(heads: int, student: AttentionSite, teacher: AttentionSite, relations: list[str]) -> None:
    for x, s_mod, t_mod in zip(relations, student.modules, teacher.modules):
        for who, module in (("student", s_mod), ("teacher", t_mod)):
            if module.out_features % heads:
                raise ValueError(f"hidden.attention_relations.heads={heads} does not divide the {who}'s {x}_proj width "
                                 f"{module.out_features}; pick a common divisor")


def default_relation_blocks(student, teacher, layers: list | None) -> tuple[int, int]:
    return (block_count(student), block_count(teacher)) if layers is None else (int(layers[0]), int(layers[1]))

