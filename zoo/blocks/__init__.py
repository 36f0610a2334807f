"""Built-in blocks. Importing this package registers each family with `zoo.registry`."""
from zoo.blocks import attention, conv, delta, infini, mamba, parallel, passthrough, rglru, selective, taipan  # noqa: F401,E501
