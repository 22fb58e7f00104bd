"""Exports a PyTorch model for tributary's `model.kind = "torchscript"`.

tributary calls the module's `forward(dense, ids)`:

  dense  float32 [B, dense_dim]   the events' "dense" arrays
  ids    int64   [B, F, L]        per sparse field (in model.sparse_fields
                                  order), the bucket ids of the bag, padded
                                  with -1; L >= 1 is the longest bag
  ->     float   B values         one score per row: a logit under
                                  model.loss = "logloss", the prediction
                                  under "squared"

Bucket ids are in [0, model.buckets): tributary hashes the sparse values
exactly as for its built-in models. It trains every parameter online
through the update log, so every replica holds the same weights, starting
from the values saved here. Keep the module deterministic (no dropout, no
random ops in forward): replicas must agree bit for bit.

  python examples/torchscript/export.py --out model.pt
  TRIBUTARY_MODEL__KIND=torchscript TRIBUTARY_MODEL__TORCHSCRIPT_PATH=model.pt \
      TRIBUTARY_MODEL__BUCKETS=65536 tributary serve
"""

import argparse

import torch


class EmbeddingMlp(torch.nn.Module):
    """Dense features and the mean embedding of each field's bag, through an MLP."""

    def __init__(self, dense_dim: int, fields: int, buckets: int, dim: int, hidden: int, sparse: bool):
        super().__init__()
        # sparse=True: autograd yields only the looked-up rows, which is
        # cheaper for big tables; tributary takes either.
        self.tables = torch.nn.ModuleList([torch.nn.Embedding(buckets, dim, sparse=sparse) for _ in range(fields)])
        for table in self.tables:
            torch.nn.init.uniform_(table.weight, -0.05, 0.05)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dense_dim + fields * dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        present = (ids >= 0).to(dense.dtype).unsqueeze(-1)  # [B, F, L, 1]
        safe = ids.clamp(min=0)
        parts = [dense]
        for field, table in enumerate(self.tables):
            rows = table(safe[:, field, :]) * present[:, field]  # [B, L, dim]
            parts.append(rows.sum(1) / present[:, field].sum(1).clamp(min=1.0))
        return self.mlp(torch.cat(parts, 1)).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="model.pt")
    p.add_argument("--dense-dim", type=int, default=8, help="model.dense_dim")
    p.add_argument("--fields", type=int, default=4, help="len(model.sparse_fields)")
    p.add_argument("--buckets", type=int, default=65536, help="model.buckets (set it to the same)")
    p.add_argument("--dim", type=int, default=8, help="embedding width")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dense-tables", action="store_true",
                   help="dense gradients for the embedding tables (slower: a full-size gradient per table and step)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    module = torch.jit.script(EmbeddingMlp(a.dense_dim, a.fields, a.buckets, a.dim, a.hidden, not a.dense_tables))
    # A quick check that forward has the shape tributary expects.
    out = module(torch.zeros(2, a.dense_dim), torch.full((2, a.fields, 1), -1, dtype=torch.long))
    assert out.shape == (2,), out.shape
    module.save(a.out)
    n = sum(t.numel() for t in module.parameters())
    print(f"wrote {a.out}: {n} parameters")


if __name__ == "__main__":
    main()
