/* kvm_probe: whether one of KVM's dirty logs (kvm_dirtylog.h) works for real here. */
#ifndef PC_KVM_PROBE_H
#define PC_KVM_PROBE_H

/* Try one dirty log (PC_KVM_LOG_*) for real on a scratch VM: the guest writes pages 3
 * and 7, then 5, and each harvest must report exactly those. 0, or negative with the
 * reason in err (naming /dev/kvm or the capability). */
int pc_kvm_probe(int mode, char *err, int errlen);

#endif /* PC_KVM_PROBE_H */
