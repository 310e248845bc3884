"""What a person looks at after a run: plots, report.html, the runs table and run comparisons.

Built from the run folder's files only (recipe.yaml, environment.json, data.json, metrics.jsonl,
summary.json, eval.json, samples.json, samples.jsonl), so any old run can be reported again.
"""
