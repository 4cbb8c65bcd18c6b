"""The standard VLM benchmarks' official scoring, on answers files as LLaVA's evaluation writes them.

One module a job:
  files        reading JSON / JSON-lines / text files, with errors naming file and line (BenchmarkInputError)
  predictions  model answers files (JSON lines with question_id and text) and matching them to questions
  normalize    the VQA / EvalAI answer normalisation and GQA's
  tally        NaN-free averages overall and per group
  vqa          VQAv2 and TextVQA soft accuracy
  gqa          GQA exact match
  scienceqa    ScienceQA-IMG option-letter accuracy
  pope         POPE accuracy, precision, recall, F1, yes-ratio per split
  mme          MME perception and cognition scores (accuracy + accuracy+ per task)
  mmmu         MMMU multiple-choice and open answers
  scoring      score_files(benchmark, ...): the one entry point, used by `jaxalign score`
  eval_folder  LLaVA's evaluation folder as data (LAYOUTS: question file, images, prompt suffix, scorer files of
               each benchmark) and its questions as the model is asked them
  answer_files the answers file (LLaVA's format), each benchmark's own result files (VQAv2 submission, GQA
               predictions, MM-Vet results, MMMU output, POPE per split) and their scoring; used by
               `jaxalign eval-suite`

Each benchmark module's docstring names the published evaluation script whose rules it follows.
"""
