"""Recall@K for image-text retrieval, as the field reports it (VSE++, CLIP, AAPE's tables).

Input: `similarity` [N_images, N_captions] (any real dtype, CPU or GPU) and `image_of_caption`
[N_captions], each caption's image index. The function knows only the captions passed in: to score
the Karpathy 5k test split, pass that split's images and captions and nothing else.

- image-to-text (i2t): an image query is correct at K when ANY of its captions is among the top K
  of all N_captions captions;
- text-to-image (t2i): a caption query is correct at K when its one image is among the top K of
  all N_images images.

Ranks and ties (deterministic and pessimistic): a query's rank is the number of WRONG candidates
scoring >= its best correct candidate, i.e. its 0-based position when every tie is broken against
it. It is correct at K when rank < K. For t2i this is the strict convention "items with score >=
the correct one's, excluding itself"; for i2t the other captions of the same image do not count
against it (they are right answers too), so two tied correct captions are still rank 0.

K larger than the candidates (e.g. t2i R@10 over 3 images) is not an error: top-K then holds every
candidate and R@K = 100, the same as clamping K to the number of candidates.

Memory: queries are processed in chunks, so beyond the input only one chunk's [queries,
candidates] comparison mask exists at a time, at 9 bytes per pair (the boolean mask plus the int64
copy torch makes of it to count), and O(N_images + N_captions) vectors; the input is never copied,
transposed or sorted. By default (`chunk_size=None`) a chunk holds as many queries as keep that
under 64 MiB: 298 image queries of the COCO 5k x 25k matrix (500 MB in float32) at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aape.errors import AAPEError

DEFAULT_KS = (1, 5, 10)
_MASK_BUDGET = 64 * 2**20  # bytes of comparison mask per chunk when chunk_size is None
_BYTES_PER_PAIR = 9  # bool mask + torch's int64 copy of it in count_nonzero/sum
_SHOW = 5  # culprits listed in an error message


class RetrievalInputError(AAPEError, ValueError):
    """The similarity matrix, caption-to-image map or K values do not describe a retrieval task."""


def recall_at_k(
    similarity: torch.Tensor,
    image_of_caption: torch.Tensor | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """{'i2t_R@K': %, ..., 't2i_R@K': %, ..., 'rsum': sum of all of them}, in percent.

    With the default ks, rsum is the sum of the six recalls, as the literature tables it."""
    ks = _check_ks(ks)
    i2t_ranks, t2i_ranks = retrieval_ranks(similarity, image_of_caption, chunk_size)
    result = {f"i2t_R@{k}": _recall(i2t_ranks, k) for k in ks}
    result.update({f"t2i_R@{k}": _recall(t2i_ranks, k) for k in ks})
    result["rsum"] = sum(result.values())
    return result


def retrieval_ranks(
    similarity: torch.Tensor, image_of_caption: torch.Tensor | Sequence[int], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t ranks [N_images], t2i ranks [N_captions]), 0-based, ties counted against the query
    (see the module docstring); on the CPU as int64."""
    image_of_caption = _check_inputs(similarity, image_of_caption, chunk_size)
    n_images, n_captions = similarity.shape
    columns = torch.arange(n_captions, device=similarity.device)
    own = similarity[image_of_caption, columns]  # each caption's score with its own image
    _check_finite(own, "the scores of captions with their own images")
    # every image has a caption (checked), so include_self=False leaves no slot of `empty` unset
    best = own.new_empty(n_images).scatter_reduce(0, image_of_caption, own, reduce="amax", include_self=False)
    # captions of image i that tie with its best one: they pass `>= best` but are not wrong answers
    tied_correct = torch.zeros(n_images, dtype=torch.long, device=own.device)
    tied_correct.scatter_add_(0, image_of_caption, (own >= best[image_of_caption]).long())
    i2t, t2i = [], []
    step = _chunk(chunk_size, n_captions)
    for start in range(0, n_images, step):
        rows = similarity[start:start + step]
        _check_finite(rows, f"similarity rows {start}..{start + len(rows) - 1}")
        at_least = (rows >= best[start:start + step, None]).sum(dim=1)
        i2t.append((at_least - tied_correct[start:start + step]).cpu())
    step = _chunk(chunk_size, n_images)
    for start in range(0, n_captions, step):
        cols = similarity[:, start:start + step]  # a view: no copy of the columns
        at_least = (cols >= own[None, start:start + step]).sum(dim=0)
        t2i.append((at_least - 1).cpu())  # minus the caption's own image
    return torch.cat(i2t), torch.cat(t2i)


def _chunk(chunk_size: int | None, candidates: int) -> int:
    """Queries per chunk: as given, or as many as keep the mask under _MASK_BUDGET."""
    return chunk_size or max(1, _MASK_BUDGET // (_BYTES_PER_PAIR * candidates))


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item()


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values:
        raise RetrievalInputError("recall_at_k needs at least one K (e.g. ks=(1, 5, 10))")
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise RetrievalInputError(f"K values must be positive integers; got {bad} in ks={values}")
    return tuple(dict.fromkeys(values))  # each K once, in the order given


def _check_inputs(
    similarity: torch.Tensor, image_of_caption: torch.Tensor | Sequence[int], chunk_size: int | None
) -> torch.Tensor:
    """Shapes, dtypes, index range and one caption per image at least; the map on similarity's device."""
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise RetrievalInputError(f"similarity must be a 2-D [N_images, N_captions] tensor; got {shape}")
    if similarity.dtype == torch.bool or similarity.is_complex():
        raise RetrievalInputError(f"similarity must hold real scores; got dtype {similarity.dtype}")
    n_images, n_captions = similarity.shape
    if n_images == 0 or n_captions == 0:
        raise RetrievalInputError(f"similarity is {n_images} x {n_captions}: retrieval needs images and captions")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise RetrievalInputError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    image_of_caption = torch.as_tensor(image_of_caption)  # a list (e.g. from flatten_captions) too
    if image_of_caption.dim() != 1 or len(image_of_caption) != n_captions:
        raise RetrievalInputError(
            f"image_of_caption must be 1-D with one entry per caption (similarity has {n_captions} "
            f"columns); got shape {tuple(image_of_caption.shape)}"
        )
    if image_of_caption.is_floating_point() or image_of_caption.dtype == torch.bool or image_of_caption.is_complex():
        raise RetrievalInputError(
            f"image_of_caption must hold integer image indices; got dtype {image_of_caption.dtype}"
        )
    index = image_of_caption.to(device=similarity.device, dtype=torch.long)
    outside = ((index < 0) | (index >= n_images)).nonzero().flatten().tolist()
    if outside:
        shown = ", ".join(f"caption {c} -> image {int(index[c])}" for c in outside[:_SHOW])
        raise RetrievalInputError(
            f"{len(outside)} caption(s) name an image outside 0..{n_images - 1} (similarity has {n_images} "
            f"rows): {shown}. Rows and image indices must come from the same image list."
        )
    uncaptioned = (torch.bincount(index, minlength=n_images) == 0).nonzero().flatten().tolist()
    if uncaptioned:
        raise RetrievalInputError(
            f"{len(uncaptioned)} image(s) have no caption, so image-to-text recall is undefined for them: "
            f"image(s) {uncaptioned[:_SHOW]}{' ...' if len(uncaptioned) > _SHOW else ''}. Drop them from the "
            f"rows or add their captions."
        )
    return index


def _check_finite(scores: torch.Tensor, what: str) -> None:
    """NaN compares false with everything and would silently rank a query first or last."""
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise RetrievalInputError(f"{what} contain NaN; check the embeddings (a zero vector normalised to NaN?)")
