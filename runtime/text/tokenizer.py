"""The tokenizer rebuilt from GGUF metadata, and text <-> token ids.

Our converter stores the checkpoint's tokenizer.json verbatim (`stepstream.tokenizer.hf_json`),
so the Hugging Face tokenizer comes back exactly, unless tokenizer.ggml.pre was edited after the
conversion (it also records the name it wrote): then, as below, with a warning. A GGUF made by llama.cpp's tools has
only the token list, merges and a pre-tokenizer *name*; from those we build the same
byte-level BPE, with the split regexes that name stands for in llama.cpp
(src/llama-vocab.cpp, the "original regex from tokenizer.json" forms).

Detokenization goes through each token's bytes, so a stream of tokens can be decoded
piece by piece without splitting a UTF-8 character.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken

from runtime.base.errors import PromptTooLong, StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.base.gguf_schema import Key

_QWEN2 = [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
_LLAMA3 = [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "qwen35": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"],
    # llama.cpp's splits for a file without tokenizer.ggml.pre (or "default"): each regex cuts
    # the pieces of the one before
    "default": [r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"\p{N}+", r"[0-9][0-9][0-9]"],
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte 0..255, in byte order."""
    decoder = _byte_decoder()
    return sorted(decoder, key=decoder.get)


def _bpe_from_vocab(tokens: list[str], types: list[int], merges: list[str], pre: str, source: str) -> str:
    """tokenizer.json text equivalent to llama.cpp's BPE built from GGUF vocab metadata."""
    if pre not in PRE_TOKENIZER_REGEXES:
        raise StepstreamError(f"{source}: pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    # special tokens too, so they keep their ids; an empty token gets a name of its own, as
    # llama.cpp's loader gives it ([EMPTY_i]), so several of them are no duplicates
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) < len(tokens):
        seen: dict[str, int] = {}
        i, t = next((i, t) for i, t in enumerate(tokens) if seen.setdefault(t, i) != i)
        raise StepstreamError(f"{source}: {Key.TOK_LIST} holds {t!r} twice (ids {seen[t]} and {i}); llama.cpp "
                              "refuses such a vocabulary too")
    pairs, dropped = [], 0
    for m in merges:
        # split at the first space after the first character, as llama.cpp's loader splits it. A
        # merge without one, or whose pieces or result are no tokens, `tokenizers` cannot hold (it
        # raised: a traceback); llama.cpp keeps it, and one whose result is no token splits back
        # into byte tokens there, so such malformed files may tokenize differently (warned)
        cut = m.find(" ", 1)
        left, right = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
        else:
            dropped += 1
    if dropped:
        warnings.warn(f"{source}: {dropped} of {len(merges)} entries of {Key.TOK_MERGES} join pieces that are no "
                      "tokens of the vocabulary; they are left out", UserWarning, stacklevel=3)
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    except Exception as e:  # the tokenizers library's own words, not its traceback
        raise StepstreamError(f"{source}: the vocabulary and merges do not make a BPE tokenizer ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # llama.cpp parses CONTROL and UNKNOWN tokens only with special parsing, USER_DEFINED ones always
    specials = [AddedToken(t, special=types[i] != TOKEN_USER_DEFINED, normalized=False)
                for i, t in enumerate(tokens) if types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) and t]
    tok.add_special_tokens([a for a in specials if a.special])
    tok.add_tokens([a for a in specials if not a.special])
    return tok.to_str()


_BYTE_DECODER = _byte_decoder()


def _piece(text: str, kind: int) -> bytes:
    """What a token prints as, following llama.cpp's token_to_piece for BPE vocabularies."""
    if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
        return text.encode("utf-8")
    if kind == TOKEN_BYTE and len(text) == 6 and text.startswith("<0x"):
        return bytes([int(text[3:5], 16)])
    if kind == TOKEN_NORMAL:
        if all(c in _BYTE_DECODER for c in text):
            return bytes(_BYTE_DECODER[c] for c in text)
        return text.encode("utf-8")
    return b""  # unused (padding rows of the embedding)



def utf8_problem(text: str) -> str | None:
    """Why `text` is no UTF-8 text, or None. Python hands over undecodable bytes of a command line
    or of stdin as lone surrogates (U+DC80..U+DCFF, 'surrogateescape'), which the tokenizer refuses
    with a TypeError; this names the first such byte."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
        raw.decode("utf-8")
    except UnicodeEncodeError as e:  # a surrogate that stands for no byte
        return f"a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    except UnicodeDecodeError as e:
        return f"byte 0x{raw[e.start]:02x} at offset {e.start}"
    return "surrogate code points standing for bytes"  # what no surrogateescape decoding gives


def _require_utf8(text: str) -> None:
    why = utf8_problem(text)
    if why is not None:
        raise StepstreamError(f"the text is not UTF-8 ({why})")

# Token texts that end generation wherever a vocabulary has them, as llama.cpp's vocabulary loader
# decides (src/llama-vocab.cpp, late 2026: "currently determined based on the token text"): a
# file names its EOS and perhaps EOT, but a model ends documents with other tokens too (the
# shipped miniature with <|end_of_text|>, its EOS being <|im_end|>).
EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                       "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})


def _typed(f: GGUFModelFile, key: str, kind: type, default):
    """The value of `key`, which must be of `kind` when present (a file edited by hand may hold
    a number where text belongs: refused in one line, as llama.cpp refuses it, not a TypeError
    deep in the tokenizer or the chat template)."""
    v = f.get(key, None)
    if v is None:
        return default
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        want = {str: "a string", bool: "a boolean", list: "an array"}[kind]
        raise StepstreamError(f"{f.path}: {key} is {type(v).__name__} {str(v)[:40]!r}, expected {want}")
    return v


def _alternatives(texts) -> re.Pattern | None:
    """A pattern matching any of `texts`, longest first (as the tokenizers library matches added
    tokens: leftmost, then longest); None for none."""
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None


class Tokenizer:
    def __init__(self, hf_json: str, tokens: list[str], types: list[int], bos: int | None, eos: int | None,
                 eot: int | None, add_bos: bool, chat_template: str | None, other_eog: tuple[int, ...] = ()):
        """other_eog: ids the file names besides EOS and EOT that end generation (EOM and the
        FIM pad, repo and separator tokens, as llama.cpp counts them)."""
        self._with_special = HFTokenizer.from_str(hf_json)
        plain = json.loads(hf_json)
        # What special=True parses: each added token's text -> its id; longest first, as the
        # tokenizers library matches them (leftmost, then longest).
        added = [t for t in plain.get("added_tokens", []) if t["content"]]
        self._added = {t["content"]: t["id"] for t in added}
        self._added_re = _alternatives(self._added)
        # What special=False leaves as text: the special (control) added tokens. The others
        # (USER_DEFINED in a GGUF: `<think>` and the like) are matched either way, as llama.cpp
        # matches all but CONTROL and UNKNOWN tokens without special parsing, and HF always.
        self._control = {t["content"]: t["id"] for t in added if t.get("special", False)}
        self._control_re = _alternatives(self._control)
        # check_fits' bound (a token covers at most the longest token's bytes) holds unless a
        # normalizer may shrink the text or an added token swallows whitespace around it
        self._bound_holds = not plain.get("normalizer") and not any(
            t.get("lstrip") or t.get("rstrip") for t in plain.get("added_tokens", []))
        plain["added_tokens"] = [t for t in plain.get("added_tokens", []) if not t.get("special", False)]
        self._plain = HFTokenizer.from_str(json.dumps(plain))
        self.tokens = tokens
        self.types = types
        self.bos_id, self.eos_id, self.eot_id = bos, eos, eot
        named = {i for i in (eos, eot, *other_eog)
                 if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)}
        self._eog = frozenset(named | {i for i, t in enumerate(tokens) if t in EOG_TEXTS})
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._bytes = [_piece(t, ty) for t, ty in zip(tokens, types)]
        self._special = [ty in (TOKEN_CONTROL, TOKEN_UNKNOWN) for ty in types]
        self._longest: int | None = None  # bytes of the longest token (check_fits), when first asked

    @classmethod
    def from_gguf(cls, f: GGUFModelFile, use_hf_json: bool = True) -> "Tokenizer":
        model = f.get(Key.TOK_MODEL, None)
        if model != "gpt2":
            raise StepstreamError(f"{f.path}: tokenizer model {model!r} is not supported; Step-3.5 uses byte-level BPE ('gpt2')")
        tokens = _typed(f, Key.TOK_LIST, list, None)
        if tokens is None:
            raise StepstreamError(f"{f.path}: required metadata key {Key.TOK_LIST!r} is missing")
        if not all(isinstance(t, str) for t in tokens):
            raise StepstreamError(f"{f.path}: {Key.TOK_LIST} must be an array of strings")
        types = _typed(f, Key.TOK_TYPES, list, None) or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
            raise StepstreamError(f"{f.path}: {Key.TOK_TYPES} must be an array of {len(tokens)} integers, one per "
                                  f"token of {Key.TOK_LIST}")
        hf_json = _typed(f, Key.HF_JSON, str, None) if use_hf_json else None
        pre, paired = _typed(f, Key.TOK_PRE, str, "default"), _typed(f, Key.HF_JSON_PRE, str, None)
        if hf_json is not None and paired is not None and pre != paired:
            warnings.warn(f"{f.path}: tokenizer.ggml.pre is {pre!r}, edited since the conversion wrote {paired!r} "
                          f"beside the checkpoint's tokenizer.json; tokenizing by {pre!r}, as llama.cpp does",
                          UserWarning, stacklevel=2)
            hf_json = None
        if hf_json is None:
            merges = _typed(f, Key.TOK_MERGES, list, None)
            if merges is None:  # byte by byte, with twice the tokens, was what ran; llama.cpp refuses it
                raise StepstreamError(f"{f.path}: {Key.TOK_MERGES} is missing: a BPE vocabulary needs its merges "
                                      "(llama.cpp refuses the file too)")
            if not all(isinstance(m, str) for m in merges):
                raise StepstreamError(f"{f.path}: {Key.TOK_MERGES} must be an array of strings")
            hf_json = _bpe_from_vocab(tokens, types, merges, pre, str(f.path))
        add_bos, bos = _typed(f, Key.TOK_ADD_BOS, bool, False), f.get(Key.TOK_BOS, None)
        if add_bos and bos is None:  # llama.cpp adds its BPE default, id 11, whatever token that is
            warnings.warn(f"{f.path}: {Key.TOK_ADD_BOS} is true but the file names no BOS token; prompts get none "
                          f"(llama.cpp adds token 11, its default), so the two may differ", UserWarning, stacklevel=2)
        return cls(
            hf_json, tokens, [int(t) for t in types], f.get(Key.TOK_BOS, None), f.get(Key.TOK_EOS, None),
            f.get(Key.TOK_EOT, None), _typed(f, Key.TOK_ADD_BOS, bool, False), _typed(f, Key.CHAT_TEMPLATE, str, None),
            tuple(f.get(k, None) for k in (Key.TOK_EOM, Key.TOK_FIM_PAD, Key.TOK_FIM_REP, Key.TOK_FIM_SEP)),
        )

    @property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation: EOS, EOT and the other ids the file names, and every token
        whose text is one of EOG_TEXTS (llama.cpp's set; a test compares with llama_vocab_is_eog)."""
        return self._eog

    def check_fits(self, text: str, limit: int | None) -> None:
        """Raise PromptTooLong, without tokenizing, when `text` must hold more than `limit` tokens:
        every token covers at most the vocabulary's longest token's bytes (a megabyte prompt is
        refused at once, where tokenizing it would take seconds of a server's time). A tokenizer
        whose normalizer or whitespace-stripping added tokens could make text shorter is never
        refused here."""
        if limit is None or len(text) <= limit or not self._bound_holds:  # a character is at least one byte
            return
        if self._longest is None:
            self._longest = max(map(len, self._bytes), default=1) or 1
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        at_least = -(-n_bytes // self._longest)
        if at_least > limit:
            raise PromptTooLong(at_least, n_bytes, limit)

    def encode(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        if not isinstance(text, (str, bytes)):
            raise StepstreamError(f"the text to tokenize must be str or bytes, got {type(text).__name__}")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:  # named, as for text, not turned into U+FFFD silently
                raise StepstreamError(f"the text is not UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start})") from None
        _require_utf8(text)
        tok = self._with_special if special else self._plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    @property
    def special_texts(self) -> tuple[str, ...]:
        """The texts that only special-token parsing turns into single ids (control tokens)."""
        return tuple(self._control)

    def defang(self, text: str, stand_in: dict[str, str]) -> str:
        """text with the first character of every special token's text swapped for its stand-in
        (stand_in: first character -> a character in no special token), so that none is left."""
        if self._control_re is None:
            return text
        while self._control_re.search(text):  # a swap can uncover a match that overlapped the one swapped
            text = self._control_re.sub(lambda m: stand_in[m.group()[0]] + m.group()[1:], text)
        return text

    def encode_rendered(self, text: str, restore: dict[str, str]) -> list[int]:
        """Ids of a rendered template whose special-token texts are all meant as control tokens:
        each becomes its id, and the text between them is tokenized as plain text after the
        texts in `restore` (a stand-in -> the original, see `defang`) are swapped back."""
        _require_utf8(text)
        swap = _alternatives(restore)

        def back(piece: str) -> str:
            return swap.sub(lambda m: restore[m.group()], piece) if swap is not None else piece

        ids: list[int] = []
        at = 0
        for m in self._added_re.finditer(text) if self._added_re is not None else ():
            ids += self._plain_ids(back(text[at : m.start()]))
            ids.append(self._added[m.group()])
            at = m.end()
        return ids + self._plain_ids(back(text[at:]))

    def _plain_ids(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return self._bytes[token] if special or not self._special[token] else b""

    def decode_bytes(self, ids, special: bool = False) -> bytes:
        """Bytes of the tokens; control tokens (BOS, EOS, ...) print only when `special`."""
        try:
            ids = list(ids)
        except TypeError:
            raise StepstreamError(f"token ids must be a sequence of integers, got {type(ids).__name__}") from None
        wrong = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
        if wrong is not None:
            raise StepstreamError(f"token ids must be integers, got {wrong!r} ({type(wrong).__name__})")
        bad = next((i for i in ids if not 0 <= i < len(self._bytes)), None)
        if bad is not None:
            raise StepstreamError(f"token id {bad!r} is not in the vocabulary of {len(self._bytes)} tokens")
        return b"".join(self._bytes[i] for i in ids if special or not self._special[i])

    def decode(self, ids, special: bool = False) -> str:
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")
