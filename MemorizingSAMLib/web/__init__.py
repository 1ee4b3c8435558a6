"""The interactive tool in a web browser (``memsam web``): Slicer's core served by trame-slicer, with the Slicer
module's own logic (MemorizingSAMCore) below a trame/Vuetify page. Needs the ``web`` extra; nothing here is
imported by the library's other modules."""
