"""Stage 4: protocols, baselines, metrics, plots, the report, and prediction with a trained model.

    metrics      accuracy, per-class accuracy, H, mean ± std over seeds
    classifiers  zero-shot, template ensemble, CuPL, linear probe, AAPE: features -> logits
    results      outcomes -> results/per-class tables, per-seed metrics, metrics.json
    report       report.md in the paper's layout
    plots        accuracy vs shots, per-class bars, confusion matrix, attention (figure 7)
    predict      `aape predict` (and the engine behind the MLflow pyfunc model)
"""
