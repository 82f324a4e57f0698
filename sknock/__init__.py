"""sknock: certificate-authenticated single-packet authorization (port knocking).

The package is split by job: ``sknock.protocol`` encodes and decodes knocks (sans-I/O),
``sknock.ports`` reads port lists, ``sknock.certificate`` reads and writes the authorization
extension, ``sknock.trust`` verifies client certificates against the CA and CRL,
``sknock.credentials`` loads key files, ``sknock.ca`` issues certificates, and ``sknock.client``
is the client library applications call.
"""

__version__ = "0.1.0"
