"""A local stand-in for the Cloud TPU API (v2, REST) for tests and demos: see `infra.fake_tpu.server`.

(Nothing is imported here, so that `python -m infra.fake_tpu.server` runs the module only once.)
"""
