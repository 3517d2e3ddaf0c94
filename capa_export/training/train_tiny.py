"""Train the tiny LLaVA-geometry model on Shapes-VQA (CPU, minutes), seeded and reproducible.

The model is a plain `LlavaForConditionalGeneration` built from `tiny_llava_config` (LLaVA-1.5's
token geometry: 336 px, patch 14, 576 visual tokens, vocabulary 32064, image token 32000, CLIP
layer -2 without CLS) with the tiny tokenizer, processor and chat template, trained from a seeded
initialisation (not the planted structure of `tiny-llava-random`).

Each training sequence is a multi-turn conversation about one image, LLaVA-instruct style:
"USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...". The 576 visual tokens dominate
the cost, so several questions per image give several supervised answers for little more compute.
The loss is cross-entropy on the answer tokens and their `</s>` only, and the LM head is applied
to those positions only (scoring all 32064 words at every position costs ~5x the step).

Run: `python -m capa_export.training.train_tiny --out DIR` (see --help); `--ship` writes the
package's weights and card (capa_export/models/weights/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import shapes_vqa
from ..models.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, TinyLlavaSpec, tiny_llava_config, tiny_llava_processor
from ..models.tiny_trained import TRAINED_NAME

SCRIPT_VERSION = "5"
#: what the card says about the auxiliary losses (the shipped model is a plain LLaVA; the read-out
#: heads are discarded, but the attention supervision shapes where its layer looks)
TRAINING_AIDS = ("cross-entropy on answer tokens, plus training-only linear read-outs (per visual token: colour, "
                 "kind, size, centre, and the patch column and row of the covering shape's centre; at the answer position after `question_probe_layer` layers: what the question "
                 "asks), plus attention supervision: heads 0 and 1 of decoder layer `attention_layer` are trained to "
                 "look, from every position that predicts an answer token, at the patches of the shape(s) the "
                 "question names (counts: <s> and each counted shape's centre patch). So that layer attends to the "
                 "asked-about region by construction; read token-ranking results with that in mind. Script version 5 adds "
                 "linear read-outs of position: each visual token's own patch centre (x, y), and the named shape's "
                 "centre from each supervised head's output, so what the heads read says where the shapes are; and "
                 "of the two named shapes' order (left of, above) from the residual stream after that layer.")
NUM_VISUAL_TOKENS = (shapes_vqa.IMAGE_SIZE // 14) ** 2
MAX_ANSWER_TOKENS = 12   # the longest answer (" triangle") is 9 byte tokens, then </s>


def default_spec() -> TinyLlavaSpec:
    """Widths of the trained model: tiny-llava-random's text widths with 4 decoder layers (half its depth:
    half the step time on a shared CPU); 3 CLIP layers so that layer -2 (the one LLaVA reads) has
    two layers of attention behind it."""
    return TinyLlavaSpec(vision_layers=3, text_layers=4)


@dataclass
class TrainConfig:
    steps: int = 250
    batch_size: int = 4
    questions_per_image: int = 6
    learning_rate: float = 2e-3
    min_learning_rate: float = 5e-5
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    patch_loss_weight: float = 1.0     # weight of the auxiliary per-patch loss (see `PatchHeads`)
    question_loss_weight: float = 1.0  # weight of the auxiliary question loss (see `QuestionHeads`)
    question_probe_layer: int = 2      # read the question heads after this many decoder layers
    attention_loss_weight: float = 1.0  # weight of the attention supervision (see `attention_loss`)
    attention_layer: int = 2           # decoder layer whose first two heads are supervised
    position_loss_weight: float = 1.0  # weight of the read-out of where the heads look (see `position_loss`)
    relation_loss_weight: float = 1.0  # weight of the read-out of the two shapes' order (see `relation_loss`)
    # Shapes per training image by fraction of the run: fewer shapes first (see `shapes_at`).
    # The default has none: with the attention supervision the full task starts learning at once.
    curriculum: tuple = ((1.0, shapes_vqa.SHAPES_PER_IMAGE),)
    seed: int = 0            # initialisation
    data_seed: int = 0       # Shapes-VQA seed; batch b holds train samples first_image + [b*B, (b+1)*B)
    first_image: int = 0     # a run continued from another's weights starts after the images that one saw
    threads: int = 2
    spec: TinyLlavaSpec = field(default_factory=default_spec)
    log_every: int = 50

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --- batches --------------------------------------------------------------------------------
class ConversationEncoder:
    """Token ids of a conversation about one image, and which positions are answer tokens.

    Encoded piecewise (the byte-level tokenizer has no merges, so pieces concatenate to the ids
    the processor gives the whole text; tests check that), so the answer positions are known
    without searching the ids."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, questions: list[tuple[str, str]], prompt_ends: list[int] | None = None,
               reply_lengths: list[int] | None = None) -> tuple[list[int], list[bool]]:
        """Ids and answer flags; `prompt_ends`, if given, receives the position of each turn's
        last prompt token (the ':' of 'ASSISTANT:', from which the answer is predicted), and
        `reply_lengths` the number of reply tokens (answer bytes and </s>) of each turn."""
        eos = self.tokenizer.eos_token_id
        ids = [self.tokenizer.bos_token_id] + self._ids("USER: ") + [IMAGE_TOKEN_ID] * NUM_VISUAL_TOKENS
        is_answer = [False] * len(ids)
        for turn, (question, answer) in enumerate(questions):
            prefix = ("\n" if turn == 0 else "USER: ") + question + " ASSISTANT:"
            prompt = self._ids(prefix)
            reply = self._ids(" " + answer) + [eos]
            ids += prompt
            if prompt_ends is not None:
                prompt_ends.append(len(ids) - 1)
            ids += reply
            if reply_lengths is not None:
                reply_lengths.append(len(reply))
            is_answer += [False] * len(prompt) + [True] * len(reply)
        return ids, is_answer

    def text(self, questions: list[tuple[str, str]]) -> str:
        """The same conversation as text, through the chat template (for the check above)."""
        messages = []
        for turn, (question, answer) in enumerate(questions):
            content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages)

    def batch(self, samples: list[shapes_vqa.VqaSample]) -> dict[str, torch.Tensor]:
        encoded, question_rows, regions, attention_rows, positions, relations = [], [], [], [], [], []
        for row, sample in enumerate(samples):
            ends: list[int] = []
            lengths: list[int] = []
            encoded.append(self.encode([(q.text, q.answer) for q in sample.questions], ends, lengths))
            question_rows += [(row, end, *question_targets(q)) for q, end in zip(sample.questions, ends)]
            # every position that predicts a reply token: ':' predicts the space, the space the
            # first letter (the first token that depends on the image), and so on to </s>
            attention_rows += [(row, end + i, len(regions) + turn)
                               for turn, (end, n) in enumerate(zip(ends, lengths)) for i in range(n)]
            owner = torch.from_numpy(shapes_vqa.patch_shape_index(sample.scene)).flatten()
            regions += [attention_targets(sample.scene, q, owner) for q in sample.questions]
            positions += [position_targets(sample.scene, q) for q in sample.questions]
            relations += [relation_targets(sample.scene, q) for q in sample.questions]
        length = max(len(ids) for ids, _ in encoded)
        first_visual = encoded[0][0].index(IMAGE_TOKEN_ID)
        attention_target = torch.zeros(len(regions), 2, length)
        for i, target in enumerate(regions):
            attention_target[i, :, first_visual:first_visual + NUM_VISUAL_TOKENS] = target[:, 1:]
            attention_target[i, :, 0] = target[:, 0]
        input_ids = torch.full((len(samples), length), PAD_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        answer_mask = torch.zeros((len(samples), length), dtype=torch.bool)
        for row, (ids, is_answer) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            answer_mask[row, :len(ids)] = torch.tensor(is_answer)
        pixel_values = self.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "answer_mask": answer_mask, "patch_labels": torch.stack([patch_labels(s.scene) for s in samples]),
                "question_targets": torch.tensor(question_rows, dtype=torch.long).reshape(-1, 2 + len(QUESTION_ATTRIBUTES)),
                "attention_target": attention_target,
                "position_target": torch.stack(positions) if positions else torch.zeros(0, 2, 2),
                "relation_target": torch.stack(relations) if relations else torch.zeros(0, 2),
                "attention_rows": torch.tensor(attention_rows, dtype=torch.long).reshape(-1, 3)}


# --- the attention supervision ----------------------------------------------------------------
def attention_targets(scene: shapes_vqa.Scene, question: shapes_vqa.Question, owner: torch.Tensor) -> torch.Tensor:
    """(2, 1 + 576): where heads 0 and 1 of the supervised layer should look from the position the
    answer is predicted from, over [<s>, visual tokens]: uniform over the patches of the region(s)
    the answer depends on (a left/above question: head 0 the first shape named, head 1 the second).
    For a count, uniform over <s> and the centre patch of each counted shape, so the share left on
    <s> (1 / (n + 1)) carries the count; a count of 0 looks at <s> only."""
    target = torch.zeros(2, 1 + NUM_VISUAL_TOKENS)
    if question.type == "count":
        grid = shapes_vqa.IMAGE_SIZE // 14
        target[:, 0] = 1.0
        for i in question.shapes:
            shape = scene.shapes[i]
            target[:, 1 + int(shape.cy) // 14 * grid + int(shape.cx) // 14] = 1.0
    else:
        heads = (question.shapes[:1], question.shapes[1:]) if len(question.shapes) == 2 else (question.shapes,) * 2
        for head, shapes in enumerate(heads):
            for i in shapes:
                target[head, 1:][owner == i + 1] = 1.0
    return target / target.sum(-1, keepdim=True)


def attention_loss(layer, captured: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy between `batch["attention_target"]` and the attention probabilities of heads
    0 and 1 of `layer` at every position that predicts a token of a question's reply
    (`batch["attention_rows"]`: row, position, question; recomputed from the layer's normalised
    input, as its attention computes them: rotary queries and keys, causal, scaled).

    Why every reply position, not only the ':' before it: answers are spelled in bytes and begin
    with a space, so the first token that depends on the image is predicted one position later,
    and "square"/"star" differ only at their second letter. Supervised at ':' alone (script
    version 2), the looked-up colour had to be copied forward a position by the last layer, and
    colour answers stayed at the prior ("yellow") after 500 steps.

    Why: without it, 600-step runs stayed at chance on every question type (the decoder did not
    find the region a question names among 576 visual tokens, though the patch and question
    read-outs showed both sides were linearly readable). Supervising where two heads look gives
    that search a direct signal. It is a training aid with a consequence: the trained model
    attends to the asked-about region by construction, in that layer; analyses of which visual
    tokens matter should be read knowing it."""
    from transformers.models.llama.modeling_llama import rotate_half

    attention = layer.self_attn
    hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
    cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in (cos, sin))  # (1, L, d) when positions are shared
    rows, ends, question = batch["attention_rows"].unbind(1)
    head_dim = attention.head_dim
    q = attention.q_proj(hidden[rows, ends]).view(len(rows), -1, head_dim)[:, :2]       # (Q, 2, d)
    # keys once per sequence (B, L, 2, d), then read by each reply position's row
    k = attention.k_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, head_dim)
    groups = attention.num_key_value_groups
    k = k[:, :, [0 // groups, 1 // groups]]                                               # kv heads of heads 0, 1
    k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
    cos_q, sin_q = cos[rows, ends][:, None], sin[rows, ends][:, None]
    q = q * cos_q + rotate_half(q) * sin_q
    scores = torch.einsum("qhd,qlhd->qhl", q, k[rows]).float() * attention.scaling
    positions = torch.arange(hidden.shape[1])
    scores = scores.masked_fill(positions[None, None, :] > ends[:, None, None], float("-inf"))
    log_p = torch.log_softmax(scores, dim=-1)
    target = batch["attention_target"][question]
    return -(target * log_p.clamp_min(-1e4)).sum(-1).mean()


# --- the read-out of where the supervised heads look ------------------------------------------
def position_targets(scene: shapes_vqa.Scene, question: shapes_vqa.Question) -> torch.Tensor:
    """(2, 2): the centre (x, y), scaled to [-1, 1], of the shape head 0 and head 1 look at for
    this question (`attention_targets`); NaN for a count (the heads look at several shapes)."""
    if question.type == "count":
        return torch.full((2, 2), float("nan"))
    named = question.shapes if len(question.shapes) == 2 else question.shapes * 2
    return torch.tensor([[2 * scene.shapes[i].cx / shapes_vqa.IMAGE_SIZE - 1,
                          2 * scene.shapes[i].cy / shapes_vqa.IMAGE_SIZE - 1] for i in named])


class PositionHead(torch.nn.Linear):
    """Linear read-out (training only, discarded) of a shape's centre (x, y) from the output of a
    supervised head (its share of the attention output, before `o_proj`); one map for heads 0 and 1,
    which share their key-value head, so the same direction of the values carries the position.

    Why (script version 5): after 11,000 steps left/above answers stayed at the yes/no prior while
    heads 0 and 1 put 90% of their attention on the two named shapes; a linear probe of the two
    heads' outputs predicted the relation at 54% (held out, 400 validation questions): what the heads
    read did not say where the shapes are in a form a comparison can use. With each head's output
    carrying its shape's x and y linearly, "left of" is the sign of a difference."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, 2)


def position_loss(head: PositionHead, head_outputs: torch.Tensor, head_dim: int, batch: dict) -> torch.Tensor:
    """Mean squared error of `head`'s read-out of heads 0 and 1 at every reply position
    (`batch["attention_rows"]`) against `batch["position_target"]`, counts left out."""
    rows, ends, question = batch["attention_rows"].unbind(1)
    target = batch["position_target"][question]                                        # (Q, 2, 2)
    keep = ~target.isnan().any(-1).any(-1)
    if not keep.any():
        return head_outputs.new_zeros(())
    outputs = head_outputs[rows[keep], ends[keep], :2 * head_dim].view(-1, 2, head_dim)
    return torch.nn.functional.mse_loss(head(outputs).float(), target[keep])


def relation_targets(scene: shapes_vqa.Scene, question: shapes_vqa.Question) -> torch.Tensor:
    """(2,): for a question naming two shapes, whether the first is left of the second and whether
    it is above it (1 / 0), as the task decides them (NaN where the centres are closer than
    `MIN_OFFSET` along that axis, and for questions naming fewer shapes)."""
    target = torch.full((2,), float("nan"))
    if len(question.shapes) == 2 and question.type != "count":
        a, b = (scene.shapes[i] for i in question.shapes)
        for axis, (first, second) in enumerate(((a.cx, b.cx), (a.cy, b.cy))):
            if abs(first - second) >= shapes_vqa.MIN_OFFSET:
                target[axis] = float(first < second)
    return target


class RelationHead(torch.nn.Linear):
    """Linear read-out (training only, discarded), at every reply position after the supervised
    layer, of the two named shapes' order: left-of and above, as logits.

    Why (script version 5): with the position read-outs, a linear probe of heads 0 and 1's
    outputs predicted the relation at 77% (held out) after 1,000 steps, but the residual stream
    after their layer still at 54%: the answer's gradient, one informative token in a third of the
    questions, did not teach that layer to write the comparison into the stream. This asks it to."""

    def __init__(self, hidden: int):
        super().__init__(hidden, 2)


def relation_loss(head: RelationHead, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Binary cross-entropy of `head` on `hidden` (the residual stream after the supervised layer)
    at every reply position against `batch["relation_target"]`, NaN targets left out."""
    rows, ends, question = batch["attention_rows"].unbind(1)
    target = batch["relation_target"][question]
    known = ~target.isnan()
    if not known.any():
        return hidden.new_zeros(())
    logits = head(hidden[rows, ends]).float()
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])


# --- the auxiliary per-patch loss -----------------------------------------------------------
PATCH_ATTRIBUTES = {  # class 0 is "no shape here" for every attribute but the centre
    "colour": ("none",) + tuple(shapes_vqa.COLOURS),
    "kind": ("none",) + shapes_vqa.KINDS,
    "size": ("none",) + shapes_vqa.SIZES,
    "centre": ("no", "yes"),
    # where the covering shape's centre is, as a patch column / row (0: no shape here)
    "column": ("none",) + tuple(range(shapes_vqa.IMAGE_SIZE // 14)),
    "row": ("none",) + tuple(range(shapes_vqa.IMAGE_SIZE // 14)),
}


def patch_labels(scene: shapes_vqa.Scene) -> torch.Tensor:
    """(576, 6) class ids per visual token: colour, kind, size of the shape covering the patch,
    whether the shape's centre falls in it (one token per shape, something to count), and the
    patch column and row of that shape's centre.

    Why the centre's column and row (script version 4): with the other read-outs, colour, shape
    and size questions reached 97-99% but left/above stayed at the yes/no prior (the model
    answered "yes" to 78% of them after 9,000 steps): the two supervised heads found both shapes,
    but what they read from them did not say where the shapes are. Every patch of a shape now
    carries its centre's position, so each head's output does."""
    grid = shapes_vqa.IMAGE_SIZE // 14
    owner = torch.from_numpy(shapes_vqa.patch_shape_index(scene)).flatten()
    labels = torch.zeros(grid * grid, len(PATCH_ATTRIBUTES), dtype=torch.long)
    for i, shape in enumerate(scene.shapes):
        here = owner == i + 1
        labels[here, 0] = PATCH_ATTRIBUTES["colour"].index(shape.colour)
        labels[here, 1] = PATCH_ATTRIBUTES["kind"].index(shape.kind)
        labels[here, 2] = PATCH_ATTRIBUTES["size"].index(shape.size)
        labels[int(shape.cy) // 14 * grid + int(shape.cx) // 14, 3] = 1
        labels[here, 4] = 1 + min(grid - 1, int(shape.cx) // 14)
        labels[here, 5] = 1 + min(grid - 1, int(shape.cy) // 14)
    return labels


QUESTION_ATTRIBUTES = {
    "type": shapes_vqa.QUESTION_TYPES,
    "first kind": ("none",) + shapes_vqa.KINDS,
    "second kind": ("none",) + shapes_vqa.KINDS,
    "colour": ("none",) + tuple(shapes_vqa.COLOURS),
}


def question_targets(question: shapes_vqa.Question) -> tuple[int, int, int, int]:
    """What a question asks, as class ids: its type, the kinds it names in order, the colour it names."""
    words = question.text.rstrip("?").split()
    kinds = [w.removesuffix("s") for w in words if w.removesuffix("s") in shapes_vqa.KINDS] + ["none", "none"]
    colours = [w for w in words if w in shapes_vqa.COLOURS] + ["none"]
    return (QUESTION_ATTRIBUTES["type"].index(question.type), QUESTION_ATTRIBUTES["first kind"].index(kinds[0]),
            QUESTION_ATTRIBUTES["second kind"].index(kinds[1]), QUESTION_ATTRIBUTES["colour"].index(colours[0]))


class AttributeHeads(torch.nn.Module):
    """One linear classifier per attribute over the same features."""

    def __init__(self, hidden: int, attributes: dict):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(c)) for c in attributes.values())

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = [torch.nn.functional.cross_entropy(head(features).flatten(0, -2).float(), labels[..., i].flatten())
                  for i, head in enumerate(self.heads)]
        return sum(losses) / len(losses)


class QuestionHeads(AttributeHeads):
    """Linear read-outs, at the position the answer is predicted from and after a few decoder
    layers, of what the question asks (type, named kinds, named colour). Training only, discarded.

    Why: questions arrive as bytes, so before the decoder can look for "the triangle" among the
    visual tokens it must assemble the word from 8 byte tokens and carry it to the answer position;
    with the answer loss alone that circuit and the visual look-up have to appear together. These
    targets train the first part on its own, from the first step."""

    def __init__(self, hidden: int):
        super().__init__(hidden, QUESTION_ATTRIBUTES)


def patch_centres() -> torch.Tensor:
    """(576, 2): each visual token's patch centre (x, y) in the image, scaled to [-1, 1] as
    `position_targets` scales shape centres (tokens run row by row, as `patch_shape_index`)."""
    grid = shapes_vqa.IMAGE_SIZE // 14
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * 2 / grid - 1
    return torch.stack([centres.repeat(grid), centres.repeat_interleave(grid)], -1)


class PatchHeads(AttributeHeads):
    """Linear read-outs of each visual token (the projector's output, what the decoder receives)
    predicting what is drawn under its patch. Used only in training and then discarded: the
    shipped model is a plain LlavaForConditionalGeneration.

    Why: at initialisation the decoder attends almost uniformly to 576 visual tokens, so the
    answer's gradient reaches the few patches of the shape asked about diluted ~100-fold, and
    learning visual features from it alone did not start within the CPU budget (single-shape
    colour questions stayed near chance after 1,600 images). Dense per-patch targets give the
    vision tower a direct signal; the decoder then learns to route to linearly readable tokens."""

    def __init__(self, hidden: int):
        super().__init__(hidden, PATCH_ATTRIBUTES)
        self.position = torch.nn.Linear(hidden, 2)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attributes' cross-entropy, plus the squared error of a linear read-out of each
        token's own patch centre (x, y), scaled to [-1, 1] (script version 5).

        Why the patch's own position, as a number: the supervised heads average the values of a
        shape's patches, and the average of the patches' positions is the shape's centroid; with
        position linear in every visual token, each head's output carries its shape's position
        linearly (see `PositionHead`), which class read-outs (column 0-23) did not give."""
        target = patch_centres().expand(*features.shape[:-1], 2)
        where = torch.nn.functional.mse_loss(self.position(features).float(), target)
        return super().loss(features, labels) + where


def answer_loss(model, batch: dict[str, torch.Tensor], heads: tuple[PatchHeads, QuestionHeads, int] | None = None):
    """Mean cross-entropy of the answer tokens (each predicted from the position before it); with
    `heads` (patch heads, question heads, probe layer[, attention layer[, position head[, relation
    head]]]), also the auxiliary losses: returns (answer loss, patch loss, question loss[, attention
    loss[, position loss[, relation loss]]])."""
    captured = {}
    hooks = [model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: captured.update(visual=out))]
    if heads is not None and len(heads) > 3:
        def keep_attention_input(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["position_embeddings"] = kwargs["position_embeddings"]
        layer = model.model.language_model.layers[heads[3]]
        hooks.append(layer.self_attn.register_forward_pre_hook(keep_attention_input, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.update(heads=args[0])))
    try:
        outputs = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], output_hidden_states=heads is not None)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = outputs.last_hidden_state
    targets_at = batch["answer_mask"].clone()
    targets_at[:, 0] = False
    rows, cols = targets_at.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols - 1]).float()
    loss = torch.nn.functional.cross_entropy(logits, batch["input_ids"][rows, cols])
    if heads is None:
        return loss
    patch_heads, question_heads, probe_layer = heads[:3]
    targets = batch["question_targets"]
    probed = outputs.hidden_states[probe_layer][targets[:, 0], targets[:, 1]]
    losses = (loss, patch_heads.loss(captured["visual"], batch["patch_labels"]),
              question_heads.loss(probed, targets[:, 2:]))
    if len(heads) > 3:
        layer = model.model.language_model.layers[heads[3]]
        losses += (attention_loss(layer, captured, batch),)
    if len(heads) > 4:
        losses += (position_loss(heads[4], captured["heads"], layer.self_attn.head_dim, batch),)
    if len(heads) > 5:
        losses += (relation_loss(heads[5], outputs.hidden_states[heads[3] + 1], batch),)
    return losses


# --- the model --------------------------------------------------------------------------------
def init_model(spec: TinyLlavaSpec, seed: int):
    """A freshly initialised plain LlavaForConditionalGeneration, deterministic from the seed."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(tiny_llava_config(spec))
    model.config.name_or_path = TRAINED_NAME
    return model


def shapes_at(config: TrainConfig, step: int) -> tuple[int, int]:
    """How many shapes the training images of `step` have.

    Why a curriculum: with one shape, "what colour is the triangle?" is answered by looking at
    the only coloured region, which the decoder learns within ~100 steps; among 2-5 shapes it must
    also select by kind, and learning both at once did not start within 450 steps (1,350 answers
    at chance). Once attention finds shapes, selecting among two or three is a small step."""
    for until, shapes in config.curriculum:
        if step < until * config.steps:
            return tuple(shapes)
    return shapes_vqa.SHAPES_PER_IMAGE


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (1 + math.cos(math.pi * progress))


def _optimizer(modules, config: TrainConfig):
    decay, no_decay = [], []
    for name, parameter in (item for module in modules for item in module.named_parameters()):
        # Norm gains, biases, embeddings: no weight decay (the usual split).
        (decay if parameter.ndim >= 2 and "embed" not in name else no_decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.learning_rate, betas=(0.9, 0.98), eps=1e-8)


def train(config: TrainConfig = TrainConfig(), log=print, model=None, batches=None, on_step=None):
    """Train and return (model, processor, history). `batches`, if given, replaces the Shapes-VQA
    stream (a callable step -> batch dict; the smoke test passes a fixed batch); `on_step(step,
    model, processor)` is called after each step (for evaluations during development)."""
    torch.set_num_threads(config.threads)
    processor = tiny_llava_processor()
    encoder = ConversationEncoder(processor)
    model = model if model is not None else init_model(config.spec, config.seed)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        patch_heads = PatchHeads(model.config.text_config.hidden_size)
        question_heads = QuestionHeads(model.config.text_config.hidden_size)
        position_head = PositionHead(model.model.language_model.layers[config.attention_layer].self_attn.head_dim)
        relation_head = RelationHead(model.config.text_config.hidden_size)
    aids = (model, patch_heads, question_heads, position_head, relation_head)
    optimizer = _optimizer(aids, config)
    parameters = [p for m in aids for p in m.parameters()]
    if batches is None:
        def batches(step):
            samples = shapes_vqa.make_split("train", config.batch_size, config.data_seed, config.questions_per_image,
                                            start=config.first_image + step * config.batch_size,
                                            shapes=shapes_at(config, step))
            return encoder.batch(samples)
    history, aux_history = [], []
    started = time.time()
    for step in range(config.steps):
        batch = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        loss, patch_loss, question_loss, look_loss, where_loss, order_loss = answer_loss(
            model, batch, (patch_heads, question_heads, config.question_probe_layer, config.attention_layer,
                           position_head, relation_head))
        optimizer.zero_grad(set_to_none=True)
        (loss + config.patch_loss_weight * patch_loss + config.question_loss_weight * question_loss
         + config.attention_loss_weight * look_loss + config.position_loss_weight * where_loss
         + config.relation_loss_weight * order_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        history.append(float(loss.detach()))
        aux_history.append((float(patch_loss.detach()), float(question_loss.detach()), float(look_loss.detach()),
                            float(where_loss.detach()), float(order_loss.detach())))
        if log and ((step + 1) % config.log_every == 0 or step == 0):
            recent = history[-config.log_every:]
            recent_aux = aux_history[-config.log_every:]
            log(f"step {step + 1}/{config.steps} loss {sum(recent) / len(recent):.4f} "
                f"patch loss {sum(a[0] for a in recent_aux) / len(recent_aux):.4f} "
                f"question loss {sum(a[1] for a in recent_aux) / len(recent_aux):.4f} "
                f"attention loss {sum(a[2] for a in recent_aux) / len(recent_aux):.4f} "
                f"position loss {sum(a[3] for a in recent_aux) / len(recent_aux):.4f} "
                f"relation loss {sum(a[4] for a in recent_aux) / len(recent_aux):.4f} "
                f"lr {_learning_rate(config, step):.2e} {time.time() - started:.0f}s")
        if on_step is not None:
            on_step(step, model, processor)
            model.train()
    model.eval()
    return model, processor, history


# --- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, processor, images, questions: list[str], batch_size: int = 16,
                     max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """Greedy answers from the model's own HF `generate`, prompt `USER: <image>\\n{q} ASSISTANT:`.

    Prompts of equal length are batched together, so no padding enters any forward pass."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    prompts = [adapter.prompt_with_image(processor, q) for q in questions]
    lengths = [len(processor.tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    answers: list[str] = [""] * len(prompts)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] == lengths[i] and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        inputs = processor(images=[images[i] for i in group], text=[prompts[i] for i in group], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=PAD_TOKEN_ID)
        for i, row in zip(group, out[:, inputs["input_ids"].shape[1]:]):
            answers[i] = _decode_until_eos(processor.tokenizer, row.tolist())
    return answers


def _decode_until_eos(tokenizer, ids: list[int]) -> str:
    """The text before the first </s>; with no </s> the whole output, marked so it never matches
    (an answer that does not end is not an answer)."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        return tokenizer.decode(ids[:ids.index(eos)])
    return tokenizer.decode(ids) + " <no end>"


def evaluate(model, processor, split: str = "test", size: int = 500, seed: int = 0, batch_size: int = 16) -> dict:
    """Exact match after `normalize_answer` on `size` questions of a split (one per image)."""
    samples = shapes_vqa.make_split(split, size, seed)
    questions = [s.questions[0] for s in samples]
    predicted = generate_answers(model, processor, [s.image for s in samples], [q.text for q in questions],
                                 batch_size=batch_size)
    correct = [shapes_vqa.normalize_answer(p) == shapes_vqa.normalize_answer(q.answer)
               for p, q in zip(predicted, questions)]
    per_type: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        per_type.setdefault(q.type, []).append(ok)
    return {
        "split": split, "questions": size, "data_seed": seed,
        "exact_match": sum(correct) / len(correct),
        "per_type": {t: {"exact_match": sum(v) / len(v), "questions": len(v)} for t, v in sorted(per_type.items())},
        "predictions": [{"question": q.text, "answer": q.answer, "predicted": p}
                        for q, p in zip(questions, predicted)],
    }


# --- shipping -------------------------------------------------------------------------------
def save_weights(model, folder: str | Path, card: dict) -> Path:
    """`model.safetensors` (fp16) + `card.json` in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).detach().contiguous()
             for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capa_export.training.train_tiny", description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--questions-per-image", type=int, default=defaults.questions_per_image)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--widths", type=json.loads, default={},
                        help='JSON of TinyLlavaSpec fields to change, e.g. \'{"text_layers": 4}\'')
    parser.add_argument("--eval-size", type=int, default=300, help="test questions measured after training")
    parser.add_argument("--log-every", type=int, default=TrainConfig().log_every, help="steps between log lines")
    parser.add_argument("--out", type=Path, help="folder for model.safetensors, card.json, predictions.jsonl")
    parser.add_argument("--ship", action="store_true", help="write into the package (capa_export/models/weights/)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="continue from the model weights of a --save-every checkpoint (a fresh optimiser and "
                             "schedule); use --first-image to start after the images that run saw")
    parser.add_argument("--first-image", type=int, default=0, help="index of the first training image")
    parser.add_argument("--relation-loss-weight", type=float, default=defaults.relation_loss_weight,
                        help="weight of the relation read-out (0: script version 5 as the card's stage 4 ran it)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="also save the training state every N steps to OUT/checkpoint.pt (long runs)")
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, questions_per_image=args.questions_per_image,
                         learning_rate=args.lr, seed=args.seed, data_seed=args.data_seed, threads=args.threads,
                         log_every=args.log_every, first_image=args.first_image,
                         relation_loss_weight=args.relation_loss_weight,
                         spec=dataclasses.replace(default_spec(), **args.widths))
    load_before = os.getloadavg()
    started = time.time()
    on_step = None
    if args.save_every and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

        def on_step(step, model, processor):
            if (step + 1) % args.save_every == 0:
                torch.save({"step": step + 1, "model": model.state_dict()}, args.out / "checkpoint.pt")
    model = None
    if args.init_from is not None:
        model = init_model(config.spec, config.seed)
        model.load_state_dict(torch.load(args.init_from, weights_only=True)["model"])
    model, processor, history = train(config, log=lambda line: print(line, flush=True), model=model, on_step=on_step)
    train_seconds = time.time() - started
    # Measure what ships: the weights rounded to fp16 (and computed in fp32, as the loader does).
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16))
    result = evaluate(model, processor, "test", args.eval_size, config.data_seed)
    print(f"test exact match {result['exact_match']:.4f} on {args.eval_size} questions; "
          + ", ".join(f"{t} {v['exact_match']:.3f}" for t, v in result["per_type"].items()), flush=True)
    import transformers

    card = {
        "model": TRAINED_NAME,
        "task": "shapes-vqa",
        "script": "capa_export.training.train_tiny",
        "script_version": SCRIPT_VERSION,
        "data_seed": config.data_seed,
        "initialised_from": str(args.init_from) if args.init_from is not None else None,
        "training_aids": TRAINING_AIDS,
        "train_images": config.steps * config.batch_size,
        "train_questions": config.steps * config.batch_size * config.questions_per_image,
        "steps": config.steps,
        "config": config.to_json(),
        "final_loss": sum(history[-50:]) / len(history[-50:]),
        "accuracy": {k: v for k, v in result.items() if k != "predictions"},
        "train_wall_seconds": round(train_seconds, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }
    out = Path(__file__).resolve().parent.parent / "models" / "weights" if args.ship else args.out
    if out is not None:
        save_weights(model, out, card)
        if not args.ship:  # the package carries the weights and the card only
            with open(out / "predictions.jsonl", "w") as handle:
                for row in result["predictions"]:
                    handle.write(json.dumps(row) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
