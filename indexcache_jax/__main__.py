"""`python -m indexcache_jax`: the main job (`indexcache_jax.demo`), IndexCache on the embedded trained model."""

from indexcache_jax.demo import main

main()
