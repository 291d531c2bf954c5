"""Token data: tokenization, formats (Megatron .bin/.idx, OLMo .npy, zarr archives), datasets, loader.

Import the pieces from their modules (`olmoe_megatron.data.config.DataConfig`,
`olmoe_megatron.data.loader.MicroBatchIterator`, ...); this package imports nothing heavy itself.
"""
