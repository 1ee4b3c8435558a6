"""The MemorizingSAM module below its Qt widgets: MRML call patterns (mrml), prompt markups (markups), the model
thread (worker), the logic that ties them to MemorizingSAMLib (logic), dependencies and downloads (dependencies),
and the self-test scenarios that run in Slicer and on slicer-core (selftest).

A package, not files beside MemorizingSAM.py: Slicer loads every top-level .py of a module's folder as a module.
"""
