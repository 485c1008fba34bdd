"""Image-text retrieval with AAPE (docs/method.md, "Retrieval"): each image's own captions are its prompts.

    metrics   Recall@K both ways, with a pessimistic tie rule
    data      the retrieval datasets (easy-vqa offline, COCO and Flickr30k Karpathy splits) and their artifact
    training  h as the retrieval query, the CLIP loss plus distillation, per-image caption banks
    pipeline  the stages' retrieval implementations (run.task: retrieval)

This file holds only names the configuration validates against, so importing it costs nothing.
"""

DATASETS = ("easy-vqa", "coco", "flickr30k")  # aape.retrieval.data.RETRIEVAL_DATASETS implements them
METHODS = ("zeroshot", "aape-nodistill", "aape")  # the queries compared: CLIP's image embedding, h with λ = 0, AAPE
