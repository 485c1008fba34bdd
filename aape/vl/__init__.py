"""Captioning and VQA with AAPE as a language-model prefix (docs/method.md, "Captioning and VQA").

    prefix    the frozen LM, the trained maps from CLIP's x and from AAPE = h(x) to prefix embeddings,
              the LM loss on target tokens, greedy and nucleus decoding
    metrics   CIDEr-D, BLEU-4, ROUGE-L (pycocoevalcap), CLIP-S and RefCLIP-S, the VQA accuracy
    data      VQAv2, easy-VQA questions and NoCaps readers, the VQA split artifact
    pipeline  the stages' captioning and VQA implementations (run.task: captioning | vqa)

This file holds only names the configuration validates against, so importing it costs nothing.
"""

TASKS = ("captioning", "vqa")
# the compared models: the prefix model without AAPE (LiMBeR), with AAPE from the retrieval stage's h
# (zero-shot: h unchanged), and with h finetuned on the task's loss plus λ·distill
METHODS = ("prefix", "aape", "aape-finetuned")
TITLES = {"prefix": "prefix model without AAPE (LiMBeR)", "aape": "+ AAPE (h from retrieval, zero-shot)",
          "aape-finetuned": "+ AAPE (h finetuned: λ·distill + task loss)"}
DATASETS = {"captioning": ("easy-vqa", "coco"), "vqa": ("easy-vqa", "vqav2")}
TRANSFER_DATASETS = {"captioning": ("nocaps", "coco", "easy-vqa"), "vqa": ()}
