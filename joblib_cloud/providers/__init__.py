"""The kinds of machines, one module (or folder) each, behind ``provisioner.Provider``."""
