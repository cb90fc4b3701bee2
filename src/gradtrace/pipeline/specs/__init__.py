"""The stages' specs, one module per stage (`gradtrace.pipeline.specs.attribute.AttributeSpec`, ...).

They import neither torch nor any stage: the CLI builds its options from them at start-up, and a refusal of a
bad argument needs nothing more. Each stage module re-exports its spec (`gradtrace.pipeline.attribute.AttributeSpec`).
"""
