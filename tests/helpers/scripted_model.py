"""A copy of a real GGUF whose greedy decoding writes a chosen text: a hand-set bigram model.

The server's tests need a model that emits tool calls, reasoning markup and malformed
variants of both, through the real runtime. A trained miniature never writes those, so this
copy keeps every tensor's name, shape and (mostly) format, and sets the weights so that the
real forward pass computes a lookup table:

    every block adds 0 to the residual   attention outputs, FFN down projections zeroed
    final hidden of token t = embed[t]   (exact: zeros are exact in every quant format)
    embed[s_i] = e_i                     one-hot, s_0 the chat template's last prompt token
    embed[t]   = e_sink                  every token that is not in the script
    output[s_{i+1}] = M e_i              so after s_i the argmax is s_{i+1}
    output[end]     = M (e_n + e_sink)   after s_n, and after any unscripted token, it stops

After the output norm (weights set to ones) the hidden state is sqrt(H) e_i, so the chosen
token leads every other by M sqrt(H) logits: greedy decoding and ordinary sampling both
follow the script. Because no block adds anything, the next token depends on the last
token alone, whatever came before it: any prompt that ends with s_0, of any length,
gives the same text, and so does a conversation that already holds the text.

A bigram has one successor per token, so the script's tokens s_1..s_n must be distinct and
differ from s_0 and from every end-of-generation token. By default the script is the text's
own tokenization, and each repeat is played by a copy of its token appended to the
vocabulary (same string, same bytes; the tokenizer never produces it): a vocabulary trained
on Python has too few quote and newline tokens for JSON. `script_ids` instead searches the
vocabulary as it is for a segmentation into distinct tokens.

More scripts can follow other prompt tails (`after`): a server that appends the start of a
forced tool call to the prompt gets its own continuation, as long as each tail ends with a
token of its own.

Embedding and output (and the MTP heads' projections) are written as F32, so the margins are
exact. The MTP heads are set the same way (eh_proj passes the next token's normalised
embedding through), so their drafts follow the script too.

Shape legend (numpy order):  V vocab   H hidden
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from runtime.base import gguf_schema as N
from runtime.base.gguf_file import GGUFModelFile
from runtime.text.chat_prompt import chat_ids
from runtime.text.tokenizer import Tokenizer

MARGIN = 4.0  # M above: the chosen logit is M * sqrt(H), every other one 0
SEARCH_STEPS = 200_000  # tokens tried by script_ids before it gives up

# Tensors that write into the residual stream, per block; zeroing them makes each block add 0.
_RESIDUAL_WRITERS = (N.ATTN_OUTPUT, N.DENSE[2], N.SHARED[2], N.EXPERTS[2])
# Norm weights the construction needs at one, so that a norm maps e_i to sqrt(H) e_i.
_ONES = (N.OUTPUT_NORM,)
_NEXTN_ONES = (N.NEXTN_ENORM, N.NEXTN_HNORM, N.NEXTN_HEAD_NORM)


def trigger_token(tokenizer: Tokenizer) -> int:
    """The last token of a chat prompt: the template's generation prompt ends with it."""
    return chat_ids(tokenizer, [{"role": "user", "content": "hi"}])[-1]


def end_token(tokenizer: Tokenizer) -> int:
    """The end-of-generation token the script ends with: <|im_end|> where it ends generation."""
    im_end = [i for i, t in enumerate(tokenizer.tokens) if t == "<|im_end|>" and i in tokenizer.eog_ids]
    if im_end:
        return im_end[0]
    if not tokenizer.eog_ids:
        raise ValueError("the tokenizer has no end-of-generation token to end the script with")
    return min(tokenizer.eog_ids)


def script_ids(tokenizer: Tokenizer, text: str, avoid=()) -> list[int]:
    """Distinct token ids, none in `avoid` and none a control token, whose bytes (decode_bytes)
    concatenate to exactly `text`. Depth-first over the vocabulary, longest token first.

    Raises ValueError naming the furthest character position that no segmentation got past.
    """
    data = text.encode("utf-8")
    if not data:
        raise ValueError("the script text is empty: the model would have to stop at once, which needs no script")
    avoid = set(avoid)
    by_first: dict[int, list[tuple[bytes, int]]] = {}
    for i in range(len(tokenizer.tokens)):
        piece = tokenizer.token_bytes(i)  # b"" for control tokens
        if piece and i not in avoid:
            by_first.setdefault(piece[0], []).append((piece, i))
    for cands in by_first.values():
        cands.sort(key=lambda c: (-len(c[0]), c[1]))

    used: set[int] = set()
    path: list[int] = []
    furthest = 0
    steps = 0

    def search(at: int) -> bool:
        nonlocal furthest, steps
        furthest = max(furthest, at)
        if at == len(data):
            return True
        for piece, i in by_first.get(data[at], ()):
            if i in used or not data.startswith(piece, at):
                continue
            steps += 1
            if steps > SEARCH_STEPS:
                return False
            used.add(i)
            path.append(i)
            if search(at + len(piece)):
                return True
            used.discard(i)
            path.pop()
        return False

    if search(0):
        return path
    char = len(data[:furthest].decode("utf-8", errors="ignore"))
    why = "the search gave up" if steps > SEARCH_STEPS else "no distinct tokens are left"
    raise ValueError(f"no segmentation of the script into distinct tokens gets past character {char} "
                     f"({text[char:char + 1]!r} in {text[max(0, char - 12):char + 12]!r}): {why}")


def _zeroed(t) -> np.ndarray:
    return np.zeros_like(np.asarray(t.data))  # zero bytes decode to 0.0 in every format used here


def fresh_script(tokenizer: Tokenizer, text: str, avoid=(), copies=()) -> tuple[list[int], list[int]]:
    """The text's own tokenization made distinct: (ids, copies). Each token keeps its id the first
    time it occurs; a repeat, or a token in `avoid`, becomes a new id past the vocabulary and the
    `copies` made before, whose token is a copy of it; the copies returned are the ids that ids
    V, V+1, ... copy (those given, then the new ones)."""
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.decode_bytes(ids) != text.encode("utf-8"):
        raise ValueError(f"the tokenizer does not give the script back byte for byte: {text[:40]!r}")
    if not ids:
        raise ValueError("the script text is empty: the model would have to stop at once, which needs no script")
    seen, out, copies = set(avoid), [], list(copies)
    for i in ids:
        if i in seen or not tokenizer.token_bytes(i):
            copies.append(i)
            i = len(tokenizer.tokens) + len(copies) - 1
        seen.add(i)
        out.append(i)
    return out, copies


def _chains(tok: Tokenizer, text: str, after: dict[str, str], extend_vocab: bool) -> tuple[list[list[int]], list[int]]:
    """[trigger, s_1, ..., s_n] for the chat prompt's script and each of `after`, and the copies."""
    scripts = {trigger_token(tok): (text, "the chat generation prompt")}
    for tail, continuation in after.items():
        ids = tok.encode(tail, add_bos=False)
        if not ids:
            raise ValueError("an empty prompt tail in `after` has no last token to follow")
        if ids[-1] in scripts:
            raise ValueError(f"the prompt tail {tail!r} ends with the token {tok.tokens[ids[-1]]!r}, as "
                             f"{scripts[ids[-1]][1]} does: one token cannot start two scripts")
        scripts[ids[-1]] = (continuation, f"the prompt tail {tail!r}")
    used = {*scripts, *tok.eog_ids}
    chains, copies = [], []
    for trigger, (script, _) in scripts.items():
        if extend_vocab:
            ids, copies = fresh_script(tok, script, used, copies)
        else:
            ids = script_ids(tok, script, used)
        used.update(ids)
        chains.append([trigger] + ids)
    return chains, copies


def write_scripted_model(src: Path, dst: Path, text: str, *, after: dict[str, str] | None = None,
                         extend_vocab: bool = True) -> Path:
    """Copy the GGUF `src` to `dst` with weights set so that greedy decoding emits exactly `text`
    after a chat prompt, and `after[tail]` after a prompt ending with the text `tail` (as
    tokenized alone), each then the end-of-generation token; after any other prompt the model
    stops at once. Returns dst.

    Without extend_vocab the vocabulary stays as it is and `script_ids` must find segmentations
    into distinct tokens (its ValueError names where none exists).
    """
    src, dst = Path(src), Path(dst)
    tok = Tokenizer.from_gguf(GGUFModelFile(src))
    end = end_token(tok)
    chains, copies = _chains(tok, text, after or {}, extend_vocab)
    r = gguf.GGUFReader(src)
    V, H = len(tok.tokens) + len(copies), int(r.fields[N.Key.EMBEDDING_LENGTH].contents())
    sink = H - 1
    n = sum(len(c) for c in chains)
    if n > sink:
        raise ValueError(f"the scripts need {n} tokens with their triggers; a model of hidden size {H} "
                         f"holds at most {sink}")

    embed = np.zeros((V, H), np.float32)  # [V, H]
    embed[:, sink] = 1.0
    output = np.zeros((V, H), np.float32)  # [V, H]
    output[end, sink] = MARGIN
    dim = 0
    for chain in chains:
        for i, t in enumerate(chain):
            embed[t] = 0.0
            embed[t, dim] = 1.0
            output[chain[i + 1] if i + 1 < len(chain) else end, dim] = MARGIN
            dim += 1
    eh_proj = np.zeros((H, 2 * H), np.float32)  # [H, 2H]: (enorm(embed), hnorm(h)) -> the embedding part
    eh_proj[:, :H] = np.eye(H, dtype=np.float32)

    def replacement(name: str, t):
        base = name.split(".", 2)[2] if name.startswith("blk.") else name
        if name == N.TOKEN_EMBD:
            return embed
        if name == N.OUTPUT or base == N.NEXTN_HEAD:
            return output
        if base == N.NEXTN_EH_PROJ:
            return eh_proj
        if base in _RESIDUAL_WRITERS:
            return _zeroed(t)
        if name in _ONES or base in _NEXTN_ONES:
            return np.ones(np.asarray(t.data).shape, np.float32)
        return None

    vocab_copies = {N.Key.TOK_LIST: [tok.tokens[c] for c in copies], N.Key.TOK_TYPES: [tok.types[c] for c in copies]}
    w = gguf.GGUFWriter(dst, r.fields[N.Key.ARCHITECTURE].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == N.Key.ARCHITECTURE:
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key in vocab_copies:
            value = list(value) + vocab_copies[key]
        w.add_key_value(key, value, field.types[0], sub)
    for t in r.tensors:
        new = replacement(t.name, t)
        if new is None or new.dtype == np.uint8:  # as stored (zeroed bytes keep the format)
            data = np.asarray(t.data) if new is None else new
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, new)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
