"""(being split out)"""

__all__: list[str] = []
