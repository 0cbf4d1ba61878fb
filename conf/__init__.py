"""freqtag's Hydra configs (installed as the package ``freqtag.conf``).

Hydra imports this package whenever it reads these configs, in every process
(the launcher's workers too), so the resolvers they use are registered here.
"""

from freqtag.train.gpu_pool import register_resolvers

register_resolvers()
