"""The gateway's routers, one per resource.

/reconstruct comes first: the router tries routes in order, and it is the path that serves traffic.
Swagger UI still groups operations by the tag order given in service.main.TAGS.
"""

from service.routes import datasets, health, jobs, models, reconstruct

ROUTERS = (reconstruct.router, health.router, jobs.router, models.router, datasets.router)

__all__ = ["ROUTERS"]
