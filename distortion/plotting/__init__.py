"""Figures (matplotlib/seaborn), imported lazily: ``import distortion`` never loads matplotlib.

Every function takes ``ax=None`` (a new figure is made when None) and returns the Axes.
"""
