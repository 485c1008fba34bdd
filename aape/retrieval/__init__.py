"""Image-text retrieval with natural-language captions as prompts (COCO 5k, Flickr30k 1k test).

    metrics  Recall@K both ways (image-to-text, text-to-image) and rsum from a similarity matrix

The captions themselves are read by aape.data.captions (Karpathy splits, COCO's annotation files,
the offline easy-VQA demo).
"""
