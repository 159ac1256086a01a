"""One rank of the S3PET search for tests/test_distributed_search.py: `python
tests/distributed_search_worker.py OUT CONFIG_JSON`, started N times with torchrun's environment
(tests/distributed_launch.py). Runs search.s3pet.run(Config(**CONFIG)) (rank 0 alone may write:
tests/distributed_cli.py) and writes OUT/search-rank<r>.json: the structure, and the gate logits at
the end of the search and at its best dev step, as this rank holds them."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cli  # noqa: E402


def record_logits(store: dict):
    """Search.outcome, also keeping this rank's final and best gate logits in `store`."""
    from search import supernet
    original = supernet.Search.outcome

    def outcome(self):
        store["final_logits"] = self.alpha.detach().tolist()
        store["best_logits"] = self.best_logits.tolist()
        return original(self)
    supernet.Search.outcome = outcome


def main():
    out, config = Path(sys.argv[1]), json.loads(sys.argv[2])
    distributed_cli.rank0_writes_only()
    from deltakit import distributed as dist
    from search.s3pet import Config, run
    store = {}
    record_logits(store)
    result = run(Config(**config))
    rank = dist.rank()
    dist.shutdown()
    (out / f"search-rank{rank}.json").write_text(json.dumps(
        {**store, "spec": result.spec, "chosen": result.chosen, "probs": result.probs, "test": result.test}))


if __name__ == "__main__":
    main()
