"""The latent cache: entries keyed by content are reused after a record is removed."""

import torch


def _counting(vae):
    calls = []
    encode = vae.encode

    def counted(pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    vae.encode = counted
    return calls


def test_latent_cache_reused_after_a_record_is_removed_hits_every_remaining_record(tiny_sdxl, tmp_path):
    from bilora_diffusion.data import load_records
    from bilora_diffusion.sdxl.cache import LatentCache
    from bilora_diffusion.sdxl.geometry import plan_geometry
    from bilora_diffusion.sdxl.models import vae_scale_factor
    from bilora_diffusion.testing import make_image_folder

    vae = tiny_sdxl["vae"]
    calls = _counting(vae)
    factor = vae_scale_factor(vae)
    folder = make_image_folder(tmp_path / "data", n=5, size=(48, 32))

    def build(cache):
        records = load_records(str(folder)).records
        geometry = plan_geometry([r.size for r in records], [(32, 32)] * len(records), factor)
        cache.build(records, geometry, True, vae, "cpu", torch.float32)
        return {r.key: (cache.get(r, g, False), cache.get(r, g, True)) for r, g in zip(records, geometry)}

    first = build(LatentCache("vae-id", str(tmp_path / "cache")))
    assert len(calls) == 10  # 5 images x 2 flips
    (folder / "img_001.png").unlink()  # the dataset loses its second record: every later record moves up
    (folder / "img_001.txt").unlink()
    calls.clear()
    again = LatentCache("vae-id", str(tmp_path / "cache"))
    second = build(again)
    assert calls == [] and (again.hits, again.misses) == (8, 0)
    assert second.keys() == first.keys() - {str(folder / "img_001.png")}
    for key, (plain, flipped) in second.items():  # each record found its own latents, not its old neighbour's
        assert torch.equal(plain, first[key][0]) and torch.equal(flipped, first[key][1])
    # in memory (no --cache_dir): rebuilding the same cache for the smaller set encodes nothing
    memory = LatentCache("vae-id", None)
    build(memory)
    calls.clear()
    (folder / "img_003.png").unlink()
    build(memory)
    assert calls == [] and memory.hits == 6
    # another VAE identity is another entry
    other = LatentCache("other-vae", str(tmp_path / "cache"))
    build(other)
    assert len(calls) == 6 and other.misses == 6
