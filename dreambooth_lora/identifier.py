"""The identifier: the word a subject is called by in prompts ("sks"), as a token of its own.

When the identifier's embedding trains (`--train-token-embedding`, the built-in models' default), the identifier
becomes one added token of the tokenizer, matched as a whole word only ("sks" never inside "sks2"), with one new
embedding row initialised as the mean of the rows of the pieces the tokenizer splits it into. No existing row
ever changes: the embedding table is not resized; the new ids are served by hooks on the frozen embedding layer
(docs/DESIGN.md, "Identifiers"). The tokenizer that knows the token is a copy; the base model's stays as loaded,
so its fingerprint and every other session are untouched.

Why hooks and our own copy of the tokenizer instead of diffusers' `load_textual_inversion`: that adds tokens that
also match inside other words, resizes the shared text encoder's table, and has no weighted mixing of rows.

In the adapter file an identifier is `lora_identifier.<token>`, a [K, dim] tensor (K = 1 for everything trained
here; K > 1 for multi-vector textual inversions, whose extra vectors are the tokens `<token>_1` … as diffusers
names them). Files written before this layout keep one row per tokenizer piece (`lora_token_embedding.<piece>`);
they are read and converted here (`from_file_tensors`).
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import AddedToken

from .errors import UserError

IDENTIFIER_PREFIX = "lora_identifier."  # diffusers skips it (no unet./text_encoder. prefix) but needs "lora" in every key
LEGACY_PREFIX = "lora_token_embedding."  # one row per tokenizer piece: files written before the token of its own
TOKEN_PATTERN = r"[A-Za-z0-9_<>-]{1,32}"  # what --token accepts (config.py)


# ----- names and choosing a free identifier (pure) -----

def vector_names(token: str, count: int) -> list[str]:
    """The added tokens of an identifier with `count` vectors: `tok`, `tok_1`, … (diffusers' multi-vector names:
    its pipelines expand `tok` into all of them before tokenizing, `TextualInversionLoaderMixin.maybe_convert_prompt`)."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def identifiers_in_use(tokens) -> set[str]:
    """Identifiers named by adapters' `token` fields (a mix lists its parts' identifiers separated by spaces)."""
    return {word.lower() for token in tokens for word in (token or "").split()}


def choose_identifier(token: str, taken: set[str], trains_embedding: bool, users: dict[str, str] | None = None) -> str:
    """`token` when no other adapter or job uses it; otherwise the first free `token2`, `token3`, … when the
    embedding trains (the subject gets a token of its own, so a mix keeps both subjects apart); with a frozen
    embedding the identifier is plain words that a second subject cannot share, so it is refused."""
    if token.lower() not in taken:
        return token
    user = (users or {}).get(token.lower())
    by = f" by {user}" if user else ""
    if not trains_embedding:
        raise UserError(
            f"The identifier {token!r} is already used{by} on this base model, and with a frozen identifier embedding "
            "two subjects with one identifier cannot be told apart, nor mixed. Choose another --token, or train its "
            "embedding (--train-token-embedding) so that it gets a token of its own.")
    for number in range(2, 10_000):
        candidate = f"{token[:32 - len(str(number))]}{number}"
        if candidate.lower() not in taken:
            return candidate
    raise UserError(f"No free identifier like {token!r} is left; choose another --token.")


def rename_in_prompt(prompt: str | None, old: str, new: str) -> str | None:
    """`prompt` with the whole word `old` (any case) replaced by `new`."""
    if not prompt or old == new:
        return prompt
    return re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])", new, prompt, flags=re.IGNORECASE)


# ----- initial rows and mixing (pure given the base table) -----

def initial_vectors(token: str, count: int, tokenizer, table: torch.Tensor) -> torch.Tensor:
    """Where an identifier starts: the mean of its pieces' rows (count 1), or each piece's row when a converted
    per-piece file has one vector per piece; [count, dim]."""
    pieces = tokenizer.tokenize(token)
    rows = table[tokenizer.convert_tokens_to_ids(pieces)].detach().float().cpu()
    if count == len(pieces):
        return rows.clone() if count > 1 else rows.mean(dim=0, keepdim=True)
    return rows.mean(dim=0, keepdim=True).expand(count, -1).clone()


def mix_identifiers(parts: list[tuple[dict[str, torch.Tensor], float]], tokenizer, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each identifier as init + Σ wᵢ (learnedᵢ − init): task arithmetic on the rows, as on the LoRA weights.

    `parts` pairs each adapter's identifiers with its text-side weight. Distinct identifiers (the default: a second
    subject gets `sks2`) stay apart; one identifier shared by several adapters gets the sum of their deltas."""
    grouped: dict[str, list[tuple[torch.Tensor, float]]] = {}
    for identifiers, weight in parts:
        for token, vectors in identifiers.items():
            grouped.setdefault(token, []).append((vectors.float(), float(weight)))
    mixed = {}
    for token, pairs in grouped.items():
        counts = {vectors.shape[0] for vectors, _ in pairs}
        if len(counts) > 1:
            raise UserError(f"Adapters share the identifier {token!r} with different numbers of vectors; they cannot be mixed.")
        init = initial_vectors(token, counts.pop(), tokenizer, table)
        mixed[token] = init + sum(weight * (vectors - init) for vectors, weight in pairs)
    return mixed


# ----- the file layout -----

def to_file_tensors(identifiers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {IDENTIFIER_PREFIX + token: vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1]).contiguous()
            for token, vectors in identifiers.items()}


def from_file_tensors(tensors: dict[str, torch.Tensor], token_hint: str = "") -> dict[str, torch.Tensor]:
    """Identifiers of a file's tensors: the current layout, or today's per-piece rows converted.

    A per-piece file keyed the rows by tokenizer pieces (`m`, `y`, `ball</w>` for "myball"); safetensors keeps
    keys sorted, so their order is recovered by spelling the identifier (`token_hint`, the file's metadata) with them.
    The converted identifier encodes its whole word exactly as before; other words no longer get its rows."""
    identifiers = {key.removeprefix(IDENTIFIER_PREFIX): value.float().reshape(-1, value.shape[-1])
                   for key, value in tensors.items() if key.startswith(IDENTIFIER_PREFIX)}
    pieces = {key.removeprefix(LEGACY_PREFIX): value.float() for key, value in tensors.items() if key.startswith(LEGACY_PREFIX)}
    if pieces:
        identifiers.update(convert_pieces(pieces, token_hint))
    return identifiers


def convert_pieces(pieces: dict[str, torch.Tensor], token_hint: str = "") -> dict[str, torch.Tensor]:
    """Per-piece rows (`{"m": v, "y": v, "ball</w>": v}`) as one identifier `{"myball": [3, dim]}`."""
    words = (token_hint or "").split()
    for word in words or [""]:
        order = spell(word.lower(), list(pieces)) if word else None
        if order:
            return {word: torch.stack([pieces[p].reshape(-1) for p in order])}
    # no hint that the pieces spell: the pieces in key order, named by what they spell
    order = sorted(pieces, key=lambda p: p.endswith("</w>"))
    token = "".join(p.removesuffix("</w>") for p in order)
    return {token: torch.stack([pieces[p].reshape(-1) for p in order])}


def spell(word: str, pieces: list[str]) -> list[str] | None:
    """An order of `pieces` (each usable more than once) that spells `word`, the last ending in `</w>`."""
    if not word:
        return []
    for piece in sorted(pieces, key=len, reverse=True):
        text = piece.removesuffix("</w>")
        final = piece.endswith("</w>")
        if text and word.startswith(text) and final == (len(text) == len(word)):
            rest = spell(word[len(text):], pieces)
            if rest is not None:
                return [piece] + rest
    return None


# ----- serving the rows in a text encoder -----

def tokenizer_with_tokens(base_tokenizer, names: list[str]) -> tuple[object, list[int]]:
    """A copy of `base_tokenizer` that knows each name as an added whole-word token, and their ids; a name that is
    already a piece of the vocabulary is refused (it would keep the piece's id and row, shared with other words).

    Also the check at submit (jobs.Jobs.with_free_identifier), with only the tokenizer loaded."""
    tokenizer = copy.deepcopy(base_tokenizer)
    # CLIP's tokenizer lowercases a prompt before it looks for added tokens
    tokenizer.add_tokens([AddedToken(name.lower(), single_word=True, normalized=True) for name in names])
    ids = tokenizer.convert_tokens_to_ids([name.lower() for name in names])
    shared = [name for name, token_id in zip(names, ids) if token_id < len(base_tokenizer)]
    if shared:
        raise UserError(
            f"The identifier {shared[0]!r} is already a piece of this model's vocabulary (it occurs inside other "
            "words), so it cannot have a token of its own; choose a rarer word such as sks or ohwx.")
    return tokenizer, ids


class IdentifierEmbedding(torch.nn.Module):
    """Rows for added identifier tokens, served by hooks on the frozen embedding layer; trainable in training.

    `tokenizer` is a copy of the base tokenizer that knows the tokens (whole words only); give it to whatever
    tokenizes prompts for this text encoder (the trainer, a pipeline)."""

    def __init__(self, base_tokenizer, table_size: int, identifiers: dict[str, torch.Tensor]):
        super().__init__()
        self.identifiers_shape = {token: tuple(vectors.reshape(-1, vectors.shape[-1]).shape) for token, vectors in identifiers.items()}
        names = [name for token, vectors in identifiers.items() for name in vector_names(token, self.identifiers_shape[token][0])]
        self.tokenizer, ids = tokenizer_with_tokens(base_tokenizer, names)
        self.table_size = table_size
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long))
        rows = [vectors.reshape(-1, vectors.shape[-1]).float() for vectors in identifiers.values()]
        self.vectors = torch.nn.Parameter(torch.cat(rows).detach().clone() if rows else torch.zeros(0, 1))
        self._handles: list = []
        self._input_ids: torch.Tensor | None = None

    @classmethod
    def new(cls, text_encoder, tokenizer, token: str) -> "IdentifierEmbedding":
        """A fresh identifier for training: one row, the mean of its pieces' rows."""
        table = text_encoder.get_input_embeddings().weight
        return cls(tokenizer, table.shape[0], {token: initial_vectors(token, 1, tokenizer, table)})

    @classmethod
    def for_text_encoder(cls, text_encoder, tokenizer, identifiers: dict[str, torch.Tensor]) -> "IdentifierEmbedding":
        dim = text_encoder.get_input_embeddings().weight.shape[1]
        for token, vectors in identifiers.items():
            if vectors.shape[-1] != dim:
                raise UserError(f"The identifier {token!r} has vectors of size {vectors.shape[-1]}; this base model's are {dim}.")
        return cls(tokenizer, text_encoder.get_input_embeddings().weight.shape[0], identifiers)

    def attach(self, text_encoder) -> "IdentifierEmbedding":
        self.detach()
        layer = text_encoder.get_input_embeddings()
        self.to(layer.weight.device)
        self._handles = [layer.register_forward_pre_hook(self._known_ids), layer.register_forward_hook(self._replace)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _known_ids(self, module, inputs):
        # the added ids lie past the table: look up row 0 for them; _replace puts the identifier's rows in
        self._input_ids = inputs[0]
        return (torch.where(inputs[0] < self.table_size, inputs[0], 0),) + tuple(inputs[1:])

    def _replace(self, module, inputs, output):
        input_ids, self._input_ids = self._input_ids, None
        for row, token_id in enumerate(self.token_ids.tolist()):
            mask = (input_ids == token_id).unsqueeze(-1)
            output = torch.where(mask, self.vectors[row].to(output.dtype), output)
        return output

    @torch.no_grad()
    def clamp_norm(self, max_norm: float) -> None:
        """Keep each learned vector no longer than a typical word's, so the identifier cannot drown
        out the rest of the prompt ("... on a green background")."""
        norms = self.vectors.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.vectors.mul_((max_norm / norms).clamp(max=1.0))

    def identifiers(self) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for token, (count, _) in self.identifiers_shape.items():
            out[token] = self.vectors[start:start + count].detach().cpu().float().clone()
            start += count
        return out

    @torch.no_grad()
    def load(self, identifiers: dict[str, torch.Tensor]) -> None:
        """Set the rows from saved identifiers of the same tokens and sizes (resuming from a checkpoint)."""
        if {t: tuple(v.reshape(-1, v.shape[-1]).shape) for t, v in identifiers.items()} != self.identifiers_shape:
            raise UserError(f"The checkpoint's identifiers {sorted(identifiers)} do not match this run's "
                            f"{sorted(self.identifiers_shape)}; it cannot be resumed.")
        self.vectors.copy_(torch.cat([identifiers[t].reshape(-1, self.vectors.shape[1]) for t in self.identifiers_shape]))

    def state(self) -> dict[str, torch.Tensor]:
        return to_file_tensors(self.identifiers())
