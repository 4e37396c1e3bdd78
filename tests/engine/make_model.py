"""Write the tiny model the engine tests serve: random weights, the real Qwen2 tokenizer, the real
Qwen2.5-Instruct chat template.

Usage: python tests/engine/make_model.py CACHE   (CACHE = the folder tests/engine/build.sh prints)
Prints the path of the .gguf, written once per (pinned llama.cpp version, this file, the template).

Nothing is downloaded: the `gguf` writer and the vocab-only `models/ggml-vocab-qwen2.gguf` both come
from the llama.cpp tree build.sh unpacked into CACHE/src. A random model needs care to be a useful
test subject:
- the output layer is its own matrix, not the embedding (tied, a random model echoes its last token);
- attention is strong next to the token's own embedding, so answers vary with the whole prompt and
  not only with its last token (always the "\\n" after "<|im_start|>assistant");
- an output bias keeps control tokens, padding and tokens holding part of a UTF-8 character out of
  free text (each answer is printable text), and gives `<|im_end|>` enough weight that answers end.
The Qwen2.5 added tokens (`<tool_call>`, `<|fim_pad|>`, …) replace the vocab file's `[PADn]` slots at
their Qwen2.5 ids, typed as Qwen2.5 GGUFs type them (tool tags user-defined, the rest control).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parent / "data" / "qwen2.5-instruct.jinja"
SEED = 20
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER, N_CTX_TRAIN = 64, 4, 2, 128, 2, 4096
IM_END = 151645
# Qwen2.5's added tokens (Qwen/Qwen2.5-7B-Instruct tokenizer_config.json "added_tokens_decoder");
# the vocab file carries only the first three, the rest are "[PADn]" placeholders at these ids.
QWEN25_ADDED = {
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
    151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>", 151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # gguf.TokenType values
# <|im_end|>'s output bias, in units of the logits' spread: greedy answers to eight short prompts
# ended after 8 to 80 tokens (7 of 8 within 80); at 2.6 none ended, at 3.5 most ended at once.
EOS_BIAS = 3.2
ATTENTION = 3.0  # scale of the value and output projections: the context outweighs the last token


def model_path(cache: Path) -> Path:
    """Where the model for this writer and template lives in the cache (the key is their hash)."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + TEMPLATE.read_bytes()).hexdigest()[:12]
    return cache / "models" / f"tiny-qwen2.5-{digest}.gguf"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each vocab character back to the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _printable(token: str, decoder: dict[str, int]) -> bool:
    """True when the token's bytes are whole UTF-8 characters (no half of a multi-byte one)."""
    try:
        bytes(decoder[ch] for ch in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return False
    return True


def write_model(src: Path, dest: Path) -> None:
    sys.path.insert(0, str(src / "gguf-py"))
    import gguf  # noqa: PLC0415  (from the llama.cpp tree, not an installed package)
    import numpy as np  # noqa: PLC0415

    vocab = gguf.GGUFReader(src / "models" / "ggml-vocab-qwen2.gguf")
    tokens = list(vocab.fields["tokenizer.ggml.tokens"].contents())
    types = list(vocab.fields["tokenizer.ggml.token_type"].contents())
    merges = list(vocab.fields["tokenizer.ggml.merges"].contents())
    for tid, text in QWEN25_ADDED.items():
        tokens[tid] = text
        types[tid] = USER_DEFINED if "tool_call" in text else CONTROL
    n_vocab = len(tokens)

    rng = np.random.default_rng(SEED)
    head_dim = N_EMBD // N_HEAD

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": mat(n_vocab, N_EMBD, 1.0).astype(np.float16),
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
    }
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            p + "attn_q.weight": mat(N_EMBD, N_EMBD, 1.0 / np.sqrt(N_EMBD)),
            p + "attn_k.weight": mat(N_EMBD // N_HEAD * N_HEAD_KV, N_EMBD, 1.0 / np.sqrt(N_EMBD)),
            p + "attn_v.weight": mat(head_dim * N_HEAD_KV, N_EMBD, ATTENTION / np.sqrt(N_EMBD)),
            p + "attn_output.weight": mat(N_EMBD, N_EMBD, ATTENTION / np.sqrt(N_EMBD)),
            p + "ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            p + "ffn_gate.weight": mat(N_FF, N_EMBD, 1.0 / np.sqrt(N_EMBD)),
            p + "ffn_up.weight": mat(N_FF, N_EMBD, 1.0 / np.sqrt(N_EMBD)),
            p + "ffn_down.weight": mat(N_EMBD, N_FF, 1.0 / np.sqrt(N_FF)),
        }
    # Untied lm head with unit rows; the hidden state is RMS-normed, so each logit has spread ~1.
    out = mat(n_vocab, N_EMBD, 1.0)
    out /= np.linalg.norm(out, axis=1, keepdims=True)  # equal norms: no token wins everywhere
    tensors["output.weight"] = out.astype(np.float16)
    decoder = _byte_decoder()
    bias = np.zeros(n_vocab, dtype=np.float32)
    for tid, (text, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or not _printable(text, decoder):
            bias[tid] = -1000.0  # finite: a grammar that needs the token can still force it
    bias[IM_END] = EOS_BIAS
    tensors["output.bias"] = bias

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")  # another session may write the same model
    w = gguf.GGUFWriter(str(tmp), "qwen2")
    w.add_name("llmproxy tiny random Qwen2.5 (test subject)")
    w.add_block_count(N_LAYER)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # as Qwen2.5-Instruct GGUFs carry them: no BOS added, <|im_end|> ends a turn, <|endoftext|> pads
    w.add_bos_token_id(151643)
    w.add_eos_token_id(IM_END)
    w.add_pad_token_id(151643)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE.read_text())
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(dest)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cache = Path(sys.argv[1])
    dest = model_path(cache)
    if not dest.exists():
        write_model(cache / "src", dest)
    print(dest)


if __name__ == "__main__":
    main()
