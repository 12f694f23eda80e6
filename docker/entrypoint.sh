#!/usr/bin/env bash
# Container entrypoint. With EARLYBERT_SSHD=1 it first starts sshd on port 2222, which `deepspeed --hostfile` reaches
# through pdsh on every node (keys: mount a folder with authorized_keys and a private key at /root/.ssh). The image's
# environment (PATH to /opt/venv, CUDA and NCCL settings) is written to /etc/environment so that the ranks started
# over ssh see the same one. Then it runs the given command.
set -euo pipefail
if [[ ${EARLYBERT_SSHD:-0} == 1 ]]; then
    ssh-keygen -A >/dev/null
    printenv | grep -E '^(PATH|LD_LIBRARY_PATH|CUDA_HOME|VIRTUAL_ENV|PYTHONUNBUFFERED|TORCH_CUDA_ARCH_LIST|NCCL_[A-Z_]+|HF_[A-Z_]+)=' \
        > /etc/environment || true
    /usr/sbin/sshd
fi
exec "$@"
