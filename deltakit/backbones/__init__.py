"""CPM backbones: the native CPM-Ant model, CPM-2 and CPM-1 converters, their tokenizers and configs.

Nothing here is imported by `import deltakit`; import the module you need, e.g.
`from deltakit.backbones import cpmant`.
"""
