"""Progress of a stage's Ray tasks on the console."""

from __future__ import annotations


def ray_progress(refs: list, desc: str, unit: str = "task") -> list:
    """Wait for Ray object refs with a progress bar; results come back in submission order."""
    import ray
    from tqdm import tqdm

    results: dict = {}
    pending = list(refs)
    index = {r: i for i, r in enumerate(refs)}
    with tqdm(total=len(refs), desc=desc, unit=unit, dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                results[index[r]] = ray.get(r)
                bar.update(1)
    return [results[i] for i in range(len(refs))]
