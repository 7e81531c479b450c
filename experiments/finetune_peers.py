"""The peers bench_finetune.py measures fastserve against: Hugging Face transformers on CPU PyTorch fine-tuning the same
BERT weights on the same batches, and the classical baselines (majority class, TF-IDF + logistic regression)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(labels, pred)), "macro_f1": float(f1_score(labels, pred, average="macro"))}


def baselines(splits: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, Any]:
    """Majority class of the training labels, and TF-IDF (word 1-2-grams, sublinear tf) + logistic regression with
    its C picked on the validation split; both trained on `train` only (as the fine-tuned models) and scored on test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = splits["train"]
    val_x, val_y = splits["validation"]
    test_x, test_y = splits["test"]
    majority = int(np.bincount(train_y).argmax())
    out: dict[str, Any] = {"majority": {"class": majority, **scores(np.full(len(test_y), majority), test_y)}}
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True)
    xtr, xval, xte = vec.fit_transform(train_x), vec.transform(val_x), vec.transform(test_x)
    by_c = {}
    for c in (1.0, 4.0, 16.0):
        clf = LogisticRegression(C=c, solver="liblinear").fit(xtr, train_y)
        by_c[c] = scores(clf.predict(xval), val_y)["accuracy"]
    best_c = max(by_c, key=by_c.get)
    clf = LogisticRegression(C=best_c, solver="liblinear").fit(xtr, train_y)
    out["tfidf_logreg"] = {"C": best_c, "validation_accuracy_by_C": by_c, "features": xtr.shape[1],
                           "fit_s": round(time.perf_counter() - t0, 2), **scores(clf.predict(xte), test_y)}
    return out


class TorchBertClassifier:
    """`BertForSequenceClassification` from a Hugging Face directory, trained as fastserve's optimizer config does:
    AdamW (decoupled weight decay on matrices only), linear warmup then linear decay to 0, global-norm clipping."""

    def __init__(self, model_dir: str, num_labels: int, lr: float, warmup: int, total_steps: int, weight_decay: float,
                 clip_norm: float, b1: float, b2: float, eps: float, seed: int, attention_dropout: float):
        import torch
        from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

        torch.manual_seed(seed)
        self.torch = torch
        self.model = BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, attention_probs_dropout_prob=attention_dropout)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(b1, b2), eps=eps)
        self.sched = get_linear_schedule_with_warmup(self.opt, warmup, total_steps)
        self.clip_norm = clip_norm

    def _inputs(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        t = self.torch
        out = {"input_ids": t.from_numpy(batch["inputs"].astype(np.int64)),
               "attention_mask": t.from_numpy(batch["mask"].astype(np.int64))}
        if "token_types" in batch:
            out["token_type_ids"] = t.from_numpy(batch["token_types"].astype(np.int64))
        return out

    def train_step(self, batch: dict[str, np.ndarray]) -> float:
        """One optimizer step on `batch` (the mean cross-entropy over its weighted examples); returns the loss."""
        t = self.torch
        self.model.train()
        logits = self.model(**self._inputs(batch)).logits
        w = t.from_numpy(batch["weights"].astype(np.float32))
        ce = t.nn.functional.cross_entropy(logits, t.from_numpy(batch["labels"].astype(np.int64)), reduction="none")
        loss = (ce * w).sum() / w.sum().clamp_min(1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm > 0:
            t.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def predict(self, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Predicted classes of the examples of weight > 0, in order."""
        self.model.eval()
        preds = []
        with self.torch.inference_mode():
            for b in batches:
                p = self.model(**self._inputs(b)).logits.argmax(-1).numpy()
                preds.append(p[b["weights"] > 0])
        return np.concatenate(preds)
