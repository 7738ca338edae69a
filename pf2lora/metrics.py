"""Evaluation metrics of the real-language tasks: classification scores and generation overlap.

Classification metrics take integer tensors of predictions and labels; generation metrics take
lists of strings. Nothing here depends on a model.

* :func:`accuracy`, :func:`macro_f1`, :func:`balanced_accuracy` (mean per-class recall over the
  classes present in the labels) and :func:`mcc` (Matthews correlation coefficient; for more than
  two classes Gorodkin's R_K, as scikit-learn computes it; 0 when undefined);
* :func:`majority_accuracy`: the accuracy of always predicting the most frequent training label;
* :func:`effective_rank`: singular values of a learned update above a fraction of the largest;
* :func:`bleu` (sacrebleu's corpus BLEU, 0-100) and :func:`rouge_l` (mean ROUGE-L F1 of
  ``rouge-score`` with stemming, scaled to 0-100 like BLEU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[true, predicted]`` counts (float64)."""
    idx = labels.long() * num_labels + pred.long()
    return torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels).double()


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Mean F1 over the classes that occur in ``labels`` or ``pred``."""
    c = confusion(pred, labels, num_labels)
    tp = c.diag()
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    return float((2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])).mean())


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    c = confusion(pred, labels, num_labels)
    support = c.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((c.diag()[present] / support[present]).mean())


def mcc(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Matthews correlation coefficient (multi-class R_K); 0 when a marginal is constant."""
    c = confusion(pred, labels, num_labels)
    n = c.sum()
    if n == 0:
        return 0.0
    t = c.sum(1)  # true counts
    p = c.sum(0)  # predicted counts
    correct = c.diag().sum()
    cov_tp = correct * n - (t * p).sum()
    cov_pp = n * n - (p * p).sum()
    cov_tt = n * n - (t * t).sum()
    denom = (cov_pp * cov_tt).sqrt()
    return float(cov_tp / denom) if denom > 0 else 0.0


def majority_accuracy(train_labels: torch.Tensor, test_labels: torch.Tensor, num_labels: int) -> tuple[int, float]:
    """(the most frequent training label, the accuracy of predicting it on ``test_labels``).

    Ties go to the smallest label index.
    """
    counts = torch.bincount(train_labels.long(), minlength=num_labels)
    majority = int(torch.argmax(counts))
    return majority, accuracy(torch.full_like(test_labels, majority), test_labels)


def majority_shares(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """The most frequent true label of the examples (the lowest on a tie): the share of the
    examples that carry it (``majority_share``) and the share predicted as it (``majority_predicted``).

    Under label skew, a model that has learned its client's label prior predicts the client's
    majority label more often than the label occurs. Both figures come from the same examples,
    so they compare directly.
    """
    if len(labels) == 0:
        return {"majority_share": float("nan"), "majority_predicted": float("nan")}
    majority = int(torch.bincount(labels, minlength=num_labels).argmax())
    return {"majority_share": float((labels == majority).float().mean()), "majority_predicted": float((pred == majority).float().mean())}


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(pred, labels),
        "macro_f1": macro_f1(pred, labels, num_labels),
        "balanced_accuracy": balanced_accuracy(pred, labels, num_labels),
        "mcc": mcc(pred, labels, num_labels),
    }


# ---------------------------------------------------------------------------------------------
# Generation


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (13a tokenisation, exponential smoothing off as in sacrebleu's default), 0-100."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


_ROUGE = None


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (``rouge-score``, Porter stemming) over the pairs, scaled to 0-100."""
    global _ROUGE
    if not hypotheses:
        return float("nan")
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [_ROUGE.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores)


def effective_rank(delta: torch.Tensor, threshold: float) -> tuple[int | None, list[float]]:
    """Number of singular values above ``threshold`` times the largest, and the spectrum."""
    if not torch.isfinite(delta).all():
        return None, []  # a diverged run: reported, not crashed on
    s = torch.linalg.svdvals(delta.double())
    if s.numel() == 0 or s[0] <= 0:
        return 0, s.tolist()
    return int((s > threshold * s[0]).sum()), s.tolist()
