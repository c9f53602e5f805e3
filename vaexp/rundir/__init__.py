"""THE run directory: its files, which config keys mean what, and the directory as a transaction.

A run directory (outputs/train/<time>_<dataset>_<model>_<objective>_m<M>_k<K>_<estimator>/, or a
sweep job's <sweep>/<overrides>/) holds config.yaml (the settings), checkpoint.pt (model,
optimizer, position, RNG states), metrics.json (the training state, the train summary, every
evaluation with the settings and checkpoint it used), test_log_px.<i>.pt (per-image values of
evaluation i; test_log_px.pt the latest), error.txt (a failed sweep job), TensorBoard events and
.vaexp.lock. layout.py: the names and key classes; transaction.py: the lock and the rollback;
files.py: atomic writes, checkpoint.pt and config.yaml; metrics.py: metrics.json and when a run
is finished. Everything is used as `rundir.<name>`. No torch at import.
"""
from vaexp.rundir.files import (CHECKPOINT_KEYS, RunDirTaken, atomic_save, atomic_write_bytes, atomic_write_text,
                                check_checkpoint, described, effective_config, load_checkpoint, load_config,
                                record_config, restore_model, task_config, with_absolute_data_paths)
from vaexp.rundir.layout import (CHECKPOINT, CONFIG, DATA_SOURCE_KEYS, ERROR_FILE, HYDRA_DIR, LOCK, METRICS,
                                 MULTIRUN_RECORD, NOT_A_SETTING, OVERRIDES_RECORD, PER_EXAMPLE, RESUMABLE,
                                 RUNTIME_ONLY, SNR_CSV, STACK_PER_RUN, WEIGHT_KEYS, absolute_data_paths, as_dict,
                                 covers, final_train, flatten, hydra_job, last_trained, lk_keys, n_epochs,
                                 override_keys, quantity_key)
from vaexp.rundir.metrics import (checkpoint_record, configured_epochs, finished_metrics, json_safe, judge,
                                  read_metrics, record_curve_point, record_evaluation, record_training,
                                  training_record)
from vaexp.rundir.transaction import (RunDirBusy, Snapshot, Transaction, abandon_all, begin, held, locked,
                                      remove_stale_temp_files)

__all__ = [name for name in dir() if not name.startswith("_") and name not in ("files", "layout", "metrics",
                                                                                "transaction")]
