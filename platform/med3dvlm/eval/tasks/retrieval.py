"""Image-text retrieval (M3D-Bench): stage 1's embeddings of the first N test pairs, recall@1/5/10 in both directions
(N = 100/500/1000/2000); blind baselines: chance among the distinct reports and the shuffled-image control."""

from __future__ import annotations

from med3dvlm.eval.tasks.base import Task, pct
from med3dvlm.models.export import CLIP

COLUMNS = ["key", "volume_id", "report", "image_to_text_rank", "text_to_image_rank"]


class RetrievalTask(Task):
    name = "retrieval"
    kind = CLIP
    paper = ("R@1 at 2,000", 0.6100, 0.1910)
    columns = ("volume_id", "volume", "report")
    csv_columns = COLUMNS
    decodes = False

    def run(self, ec, out, log) -> dict:
        """All or nothing (the ranks need every pair): an earlier samples.csv is replaced."""
        (out / "samples.csv").unlink(missing_ok=True)
        return run_retrieval(ec, out, log)

    def table(self, res):
        lines = ["| N | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |",
                 "|--:|--:|--:|--:|--:|--:|--:|"]
        for n, r in res["metrics"].items():
            lines.append(f"| {n} | " + " | ".join(f"{100 * r[f'{d}_R@{k}']:.2f}" for d in ("image_to_text",
                                                  "text_to_image") for k in (1, 5, 10)) + " |")
        return lines + ["", "image->text ranks reports per volume (the paper's \"IR\"); text->image ranks volumes "
                            "per report (\"TR\")."]

    def baseline_lines(self, b):
        c, d = b["control"], b["distinct"]
        return ["", f"Baselines on all {b['n']} pairs: chance R@1 {pct(b['chance_R@1'])} (a pick among the "
                f"{b['distinct_reports']} distinct reports); shuffled-image control image->text R@1 "
                f"{pct(c.get('image_to_text_R@1', 0))}, text->image {pct(c.get('text_to_image_R@1', 0))}; Wilson "
                f"interval of image->text R@1 {'-'.join(map(pct, b['interval']['image_to_text_R@1']))}.",
                f"Among the distinct reports (identical texts one answer; the table's M3D-Bench rule counts only the "
                f"diagonal): image->text R@1 {pct(d['image_to_text_R@1'])} ({'-'.join(map(pct, d['interval']))}), "
                f"shuffled-image control {pct(d['control_image_to_text_R@1'])}."]

    def footer(self, res, sample):
        return f"{res['n']} pairs."


def run_retrieval(ec, out, log) -> dict:
    import numpy as np
    import torch

    from med3dvlm.eval.feed import dataset, pool_args
    from med3dvlm.eval.predict import Embedder
    from med3dvlm.eval.results import SampleWriter
    from med3dvlm.eval.retrieval import rank_of_target, retrieval_at_n
    from med3dvlm.plots import plot_similarity

    ds = dataset(ec, list(RetrievalTask.columns)).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": ec.model, "device": ec.device,
                                         "threads": max(1, int(ec.cpus_per_replica))}, **pool_args(ec))
    ids, reports, img, txt = [], [], [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids += [str(x) for x in b["volume_id"]]
        reports += [str(x) for x in b["report"]]
        img.append(b["image_embedding"])
        txt.append(b["text_embedding"])
        log(f"[evaluate] embedded {len(ids)} pairs")
    img_t, txt_t = torch.from_numpy(np.concatenate(img)), torch.from_numpy(np.concatenate(txt))
    s = img_t @ txt_t.t()
    i2t, t2i = rank_of_target(s), rank_of_target(s.t())
    w = SampleWriter(out / "samples.csv", COLUMNS)
    w.write([{"key": k, "volume_id": k, "report": r, "image_to_text_rank": int(a), "text_to_image_rank": int(b)}
             for k, r, a, b in zip(ids, reports, i2t.tolist(), t2i.tolist())])
    w.close()
    plot_similarity(s[:min(len(ids), 200), :min(len(ids), 200)], out / "similarity.png", ec.split)
    return {"metrics": retrieval_at_n(img_t, txt_t, ec.n), "n": len(ids),
            "baselines": retrieval_baselines(img_t, txt_t, reports, i2t, t2i)}


def retrieval_baselines(img, txt, reports: list[str], i2t, t2i) -> dict:
    """On all pairs: chance among the distinct reports, the shuffled-image control, Wilson intervals of R@1."""
    from med3dvlm.eval.baselines import retrieval_chance, rotation, wilson
    from med3dvlm.eval.retrieval import distinct_report_ranks, retrieval_metrics

    n = len(reports)
    shuffled = img[rotation(n)] if n > 1 else None
    control = retrieval_metrics(shuffled, txt, ks=(1, 5)) if n > 1 else {}
    hits = int((distinct_report_ranks(img, txt, reports) <= 1).sum())
    hits_control = int((distinct_report_ranks(shuffled, txt, reports) <= 1).sum()) if n > 1 else 0
    return {"n": n, "distinct_reports": len(set(reports)), "chance_R@1": retrieval_chance(reports),
            "control": {k: v for k, v in control.items() if k != "n"},
            "interval": {"image_to_text_R@1": wilson(int((i2t <= 1).sum()), n),
                         "text_to_image_R@1": wilson(int((t2i <= 1).sum()), n)},
            # image->text R@1 among the distinct reports: the figure that chance_R@1 is chance of
            "distinct": {"image_to_text_R@1": hits / max(n, 1), "control_image_to_text_R@1": hits_control / max(n, 1),
                         "interval": wilson(hits, n)}}
