//! The KVM edge: guest memory, the vCPU loop, CPUID, boot and the emulation fallback.
