"""The bucket batch sampler: every batch is one bucket of one dataset.

Per epoch (as sd-scripts' make_buckets/shuffle_buckets): each image is put in
its bucket `num_repeats` times, each bucket is shuffled and cut into batches of
its dataset's `batch_size` (the last one may be short), and all batches are
shuffled together. The order depends only on `seed` and the epoch, so a
resumed run sees the same batches. Each item is (row, sample seed, epoch):
the sample seed drives that sample's flip/crop/caption randomness, which makes
it independent of the number of data-loader workers.
"""

import random

from lora_sd.errors import DataError

# Samples per epoch held as a list of rows (as sd-scripts): ~1 GB at this size; beyond it a huge num_repeats
# would only end in a MemoryError traceback.
MAX_EPOCH_SAMPLES = 10**8


def epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(f"lora_sd:{seed}:{epoch}")


class BucketBatchSampler:
    """Yields lists of (row, sample_seed, epoch); `epoch` advances by one per pass.

    `choose_epoch(e)` (what TrainData.set_epoch calls) picks the next pass's
    epoch explicitly, for resume. It is deliberately not named `set_epoch`:
    accelerate calls `batch_sampler.set_epoch(its own pass counter)`, which
    would override the training loop's epoch after a resume.
    """

    def __init__(self, rows_dataset: list[int], rows_bucket: list[tuple[int, int]], rows_repeats: list[int],
                 batch_sizes: list[int], seed: int):
        self.seed = seed
        self.epoch = 0
        self.batch_sizes = batch_sizes
        if sum(rows_repeats) > MAX_EPOCH_SAMPLES:
            raise DataError(f"an epoch of {sum(rows_repeats)} samples (images x `num_repeats`) is more than "
                            f"{MAX_EPOCH_SAMPLES} held in memory; lower `num_repeats`")
        # (dataset, bucket) -> rows, each row repeated: fixed for the whole run
        self.groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for row, (d, bucket, repeats) in enumerate(zip(rows_dataset, rows_bucket, rows_repeats)):
            self.groups.setdefault((d, bucket), []).extend([row] * repeats)
        self._len = sum(-(-len(rows) // batch_sizes[d]) for (d, _), rows in self.groups.items())

    def __len__(self) -> int:
        return self._len

    def choose_epoch(self, epoch: int):
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        rng = epoch_rng(self.seed, epoch)
        out = []
        for (d, _), rows in sorted(self.groups.items()):
            rows = rows[:]
            rng.shuffle(rows)
            size = self.batch_sizes[d]
            out += [rows[i:i + size] for i in range(0, len(rows), size)]
        rng.shuffle(out)
        return [[(row, rng.getrandbits(63), epoch) for row in batch] for batch in out]

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        yield from self.batches(epoch)
