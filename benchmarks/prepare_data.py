"""Build the data folder ``fidelity.py --data-root`` reads, from public copies (issue #18, item 6).

    DATA_ROOT/ag_news/train.parquet        text, label (0 World, 1 Sports, 2 Business, 3 Sci/Tech), has_title, source
    DATA_ROOT/ag_news/test.parquet         text, label, title, description (the official 7,600-row test split)
    DATA_ROOT/ag_news/classes.txt
    DATA_ROOT/dataclue_cic/{train,dev,test_public,labels}.json     (``--cic``: DataCLUE CIC, JSON Lines, as published)
    DATA_ROOT/bert_base_chinese_tokenizer/                          (``--chinese-tokenizer``: for the cic grid)

AG News from the hub (``--ag-news hub``: ``datasets.load_dataset("fancyzhx/ag_news")``, needs network) or from a
local copy (``--ag-news DIR``): the classic char-CNN release ``ag_news_csv/`` (``train.csv``/``test.csv``: class
1-4, title, description, no header), or a folder with ``train.parquet``/``test.parquet`` holding ``text`` and
``label`` (0-3). ``text`` is title + " " + description, as in the paper and the hub's ``text``; the hub gives
only ``text``, so its ``title``/``description`` are null and every row has ``has_title`` true.

What differs from the project's own ``../shared/data``: its train.parquet is a 29,200-row deduplicated union
of public random subsets of the train split (12,179 with a title), not the full 120,000 rows, and those
subsets are not published with row ids. From a full public copy, ``corrupt`` therefore draws other training
rows for the same seed, and the accuracies move within their seed spread; the test split (and
``fidelity.py``'s fixed 2,000-row subset of it, the first 500 rows of each class in file order) is the same.

    python benchmarks/prepare_data.py --out data --ag-news hub                    # needs the hub
    python benchmarks/prepare_data.py --out data --ag-news ~/dl/ag_news_csv       # a local copy
    python benchmarks/prepare_data.py --out data --cic ~/DataCLUE/datasets/raw_cic --chinese-tokenizer hub
    python benchmarks/fidelity.py --data-root data --grid table1-frozen --out bench-work/frozen
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path
from typing import Any

AG_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
HUB_AG_NEWS = "fancyzhx/ag_news"  # formerly "ag_news"; the same train/test splits of the char-CNN release
CIC_FILES = ("train.json", "dev.json", "test_public.json", "labels.json")


def _write_parquet(rows: dict[str, list[Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), tmp)
    os.replace(tmp, path)


def read_ag_csv(path: Path) -> dict[str, list[Any]]:
    """One split of ``ag_news_csv``: rows ``"class","title","description"``, class 1-4, no header."""
    out: dict[str, list[Any]] = {"text": [], "label": [], "title": [], "description": []}
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= 4:
                raise SystemExit(f'{path}:{n}: expected "class 1-4","title","description", got {row[:3]}')
            title, description = row[1], row[2]
            out["text"].append(f"{title} {description}")
            out["label"].append(int(row[0]) - 1)
            out["title"].append(title)
            out["description"].append(description)
    return out


def read_ag_parquet(paths: list[Path]) -> dict[str, list[Any]]:
    """A parquet split (one file or the hub's shards) with ``text`` and ``label`` 0-3; ``title``,
    ``description`` and ``has_title`` are kept when present (so this project's own copy reads back as it is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = paths[0]
    t = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
    missing = {"text", "label"} - set(t.column_names)
    if missing:
        raise SystemExit(f"{path}: no column {', '.join(sorted(missing))} (need text and label 0-3)")
    n = t.num_rows
    return {
        "text": t["text"].to_pylist(),
        "label": [int(x) for x in t["label"].to_pylist()],
        "title": t["title"].to_pylist() if "title" in t.column_names else [None] * n,
        "description": t["description"].to_pylist() if "description" in t.column_names else [None] * n,
        **({"has_title": t["has_title"].to_pylist()} if "has_title" in t.column_names else {}),
    }


def read_ag_hub(split: str) -> dict[str, list[Any]]:  # pragma: no cover - needs the hub
    from datasets import load_dataset

    ds = load_dataset(HUB_AG_NEWS, split=split)
    return {
        "text": list(ds["text"]),
        "label": [int(x) for x in ds["label"]],
        "title": [None] * len(ds),
        "description": [None] * len(ds),
    }


def read_ag_split(source: str, split: str) -> tuple[dict[str, list[Any]], str]:
    """One split and the name of where it came from."""
    if source == "hub":
        return read_ag_hub(split), f"hub:{HUB_AG_NEWS}"
    folder = Path(source).expanduser()
    if (folder / f"{split}.csv").is_file():
        return read_ag_csv(folder / f"{split}.csv"), f"{folder.name}/{split}.csv"
    # train.parquet, or the hub's shards as downloaded (data/train-00000-of-00001.parquet)
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", f"data/{split}-*.parquet"):
        shards = sorted(folder.glob(pattern))
        if shards:
            return read_ag_parquet(shards), f"{folder.name}/{pattern}"
    raise SystemExit(f"{folder}: neither {split}.csv (ag_news_csv) nor {split}.parquet (or its shards) found")


def build_ag_news(source: str, out: Path) -> dict[str, int]:
    """``out/ag_news/{train,test}.parquet`` and classes.txt; returns the row counts."""
    counts = {}
    for split in ("train", "test"):
        rows, origin = read_ag_split(source, split)
        bad = sorted({y for y in rows["label"] if y not in range(4)})
        if bad:
            raise SystemExit(f"AG News {split}: labels must be 0-3, found {bad[:5]}")
        if split == "train":
            # the paper's text is title + description; a row of a copy without titles cannot be told apart,
            # so has_title says whether this copy had a title for the row
            has_title = rows.get("has_title") or [t is None or bool(t.strip()) for t in rows["title"]]
            table = {
                "text": rows["text"],
                "label": rows["label"],
                "has_title": has_title,
                "source": [origin] * len(rows["text"]),
            }
        else:
            table = {k: rows[k] for k in ("text", "label", "title", "description")}
        _write_parquet(table, out / "ag_news" / f"{split}.parquet")
        counts[split] = len(rows["text"])
    (out / "ag_news" / "classes.txt").write_text("\n".join(AG_CLASSES) + "\n")
    return counts


def build_cic(source: Path, out: Path) -> None:
    """DataCLUE CIC as published (``datasets/raw_cic/`` of the DataCLUE repository), copied unchanged."""
    missing = [f for f in CIC_FILES if not (source / f).is_file()]
    if missing:
        raise SystemExit(f"{source}: missing {', '.join(missing)} (expected DataCLUE's datasets/raw_cic/)")
    dest = out / "dataclue_cic"
    dest.mkdir(parents=True, exist_ok=True)
    for f in CIC_FILES:
        shutil.copyfile(source / f, dest / f)


def build_chinese_tokenizer(source: str, out: Path) -> None:  # pragma: no cover - needs the hub or a copy
    """The bert-base-chinese tokenizer only (no weights): ``hub`` or a local folder."""
    from transformers import AutoConfig, AutoTokenizer

    name = "google-bert/bert-base-chinese" if source == "hub" else source
    dest = out / "bert_base_chinese_tokenizer"
    AutoTokenizer.from_pretrained(name).save_pretrained(str(dest))
    AutoConfig.from_pretrained(name).save_pretrained(str(dest))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the data root to build (fidelity.py --data-root)")
    ap.add_argument("--ag-news", default=None, help="'hub', or a folder with train/test .csv (ag_news_csv) or .parquet")
    ap.add_argument("--cic", type=Path, default=None, help="a local copy of DataCLUE's datasets/raw_cic/")
    ap.add_argument("--chinese-tokenizer", default=None, help="'hub', or a local bert-base-chinese folder")
    args = ap.parse_args(argv)
    if not (args.ag_news or args.cic or args.chinese_tokenizer):
        ap.error("nothing to build: give --ag-news, --cic and/or --chinese-tokenizer")
    if args.ag_news:
        counts = build_ag_news(args.ag_news, args.out)
        print(f"{args.out / 'ag_news'}: train {counts['train']} rows, test {counts['test']} rows")
    if args.cic:
        build_cic(args.cic, args.out)
        print(args.out / "dataclue_cic")
    if args.chinese_tokenizer:
        build_chinese_tokenizer(args.chinese_tokenizer, args.out)
        print(args.out / "bert_base_chinese_tokenizer")


if __name__ == "__main__":
    main()
